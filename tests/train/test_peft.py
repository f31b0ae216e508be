"""The parameter-efficient kinds beside LoRA, both ways through the PEFT format: adapters lmkernel trains
and saves give peft's logits on transformers' models, adapters peft saves load into lmkernel with its
logits (AdaLoRA with a pruned rank pattern, (IA)3, prompt tuning; a BERT classifier and a decoder); the
bottleneck adapter round-trips through its own format and is served unmerged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lora_checks import LABELS, classify_logits, hf_classify_logits, hf_llama, minilm_classifier
from model_checks import flatten

from lmkernel import LLM, SamplingParams, load_model
from lmkernel.engine.adapters import shared_copy
from lmkernel.errors import AdapterError, LmkError
from lmkernel.layers.bottleneck import BottleneckLinear
from lmkernel.loader.adapter import read_adapter
from lmkernel.train.peft import PeftSettings, start

KINDS = ("adalora", "ia3", "prompt")
DECODER_KINDS = KINDS + ("prefix",)  # prefix tuning: decoders only (transformers' BERT takes no past keys)
PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor away from its start, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if "ia3_l" in name:
                    p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_E" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _prune(run, seed: int) -> None:
    """An AdaLoRA rank pattern as the allocator leaves one: some triplets of each layer masked."""
    g = torch.Generator().manual_seed(seed)
    run.allocator.pattern = {n: torch.rand(m.r, generator=g) > 0.4 for n, m in
                             ((n, run.model.get_submodule(n)) for n in run.wrapped)}
    run.allocator._apply()


@pytest.fixture(scope="module")
def seqs(minilm, phrasebank_sentences):
    return minilm.tokenizer.encode_batch(phrasebank_sentences[:6])


@pytest.fixture(scope="module")
def bert_runs(minilm_dir, seqs, tmp_path_factory):
    """One MiniLM classifier per kind, wrapped, randomised and saved by lmkernel."""
    out = {}
    for i, kind in enumerate(KINDS + ("adapter",)):
        run = start(minilm_classifier(minilm_dir, seed=5), PeftSettings.parse(kind, "r=6,target_r=3" if kind == "adalora" else ""),
                    ["classifier"], seed=0, total_steps=10)
        _randomize(run.model, seed=10 + i)
        if kind == "adalora":
            _prune(run, seed=3)
        run.model.eval()
        directory = run.save(tmp_path_factory.mktemp(kind) / "adapter", str(minilm_dir), "SEQ_CLS", ["classifier"],
                             "BertForSequenceClassification", LABELS)
        out[kind] = SimpleNamespace(run=run, dir=directory, logits=classify_logits(run.model, seqs))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_bert_adapter_we_save_gives_peft_s_logits(kind, bert_runs, minilm_dir, seqs):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    ours = bert_runs[kind]
    base = classify_logits(minilm_classifier(minilm_dir, seed=5), seqs)
    assert (ours.logits - base).abs().max() > 0.05  # the adapter matters
    hf = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    theirs = hf_classify_logits(PeftModel.from_pretrained(hf, ours.dir).eval(), seqs)
    torch.testing.assert_close(ours.logits, theirs, atol=1e-4, rtol=1e-4)
    # The directory is a model too: lmkernel loads the base it names with the adapter applied.
    loaded = load_model(str(ours.dir))
    assert loaded.config.id2label == LABELS
    torch.testing.assert_close(classify_logits(loaded.model, seqs), ours.logits, atol=1e-4, rtol=1e-4)


def _peft_config(kind: str, task_type: str, targets: list[str] | None = None):
    import peft

    if kind == "adalora":
        return peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, total_step=10, task_type=task_type,
                                  target_modules=targets)
    if kind == "ia3":
        return peft.IA3Config(task_type=task_type)
    if kind == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=5)
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=5)


def _peft_prune(model, seed: int) -> None:
    """Give a peft AdaLoRA model a rank pattern (as its allocator would) so it saves cut factors."""
    g = torch.Generator().manual_seed(seed)
    pattern = {}
    for name, p in model.base_model.model.named_parameters():
        if "lora_E.default" in name:
            keep = torch.rand(p.shape[0], generator=g) > 0.4
            keep[0] = True
            with torch.no_grad():
                p.masked_fill_(~keep[:, None], 0.0)
            pattern[name] = keep.tolist()
    model.peft_config["default"].rank_pattern = pattern


@pytest.mark.parametrize("kind", KINDS)
def test_bert_adapter_peft_saves_loads_with_the_same_logits(kind, minilm_dir, seqs, tmp_path):
    from peft import get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    model = get_peft_model(hf, _peft_config(kind, "SEQ_CLS", ["query", "value"]))
    _randomize(model, seed=7)
    if kind == "adalora":
        _peft_prune(model, seed=8)
    model.eval()
    theirs = hf_classify_logits(model, seqs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(minilm_dir, adapter=tmp_path / "adapter")
    assert loaded.config.hf_architecture == "BertForSequenceClassification"
    torch.testing.assert_close(classify_logits(loaded.model, seqs), theirs, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm_runs(smollm_gguf, tmp_path_factory):
    lm = load_model(smollm_gguf, quantization=None)
    ids = lm.tokenizer.encode(PROMPT)
    base = lm.logits(ids)
    state = dict(lm.model.state_dict())
    out = {}
    for i, kind in enumerate(DECODER_KINDS):
        model = shared_copy(lm.model)
        run = start(model, PeftSettings.parse(kind, "r=6,target_r=3" if kind == "adalora" else ""), [], seed=0,
                    total_steps=10)
        _randomize(run.model, seed=20 + i)
        if kind == "adalora":
            _prune(run, seed=4)
        run.model.eval()
        ids_t, positions, meta = flatten([ids], causal=True)
        with torch.no_grad():
            logits = run.model.compute_logits(run.model(ids_t, positions, meta))
        directory = run.save(tmp_path_factory.mktemp(kind) / "adapter", "smollm2-135m-instruct", "CAUSAL_LM", [],
                             "LlamaForCausalLM", None)
        out[kind] = SimpleNamespace(dir=directory, logits=logits)
    return SimpleNamespace(lm=lm, ids=ids, base=base, state=state, runs=out)


@pytest.mark.slow  # SmolLM2 through peft or the engine: `make test`
@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_decoder_adapter_we_save_gives_peft_s_logits(kind, smollm_runs):
    from peft import PeftModel

    ours = smollm_runs.runs[kind]
    assert (ours.logits - smollm_runs.base).abs().max() > 0.5
    hf = hf_llama(SimpleNamespace(state_dict=lambda: smollm_runs.state), smollm_runs.lm.config)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, ours.dir).eval()(torch.tensor([smollm_runs.ids])).logits[0]
    torch.testing.assert_close(ours.logits, theirs[-len(smollm_runs.ids):], atol=2e-3, rtol=1e-4)


@pytest.mark.slow  # SmolLM2 through peft or the engine: `make test`
@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_decoder_adapter_peft_saves_loads_with_the_same_logits(kind, smollm_runs, smollm_gguf, tmp_path):
    from peft import get_peft_model

    torch.manual_seed(0)
    hf = hf_llama(SimpleNamespace(state_dict=lambda: {k: v.clone() for k, v in smollm_runs.state.items()}),
                  smollm_runs.lm.config)
    model = get_peft_model(hf, _peft_config(kind, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]))
    _randomize(model, seed=9)
    if kind == "adalora":
        _peft_prune(model, seed=10)
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([smollm_runs.ids])).logits[0][-len(smollm_runs.ids):]
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(smollm_gguf, quantization=None, adapter=tmp_path / "adapter")
    ids_t, positions, meta = flatten([smollm_runs.ids], causal=True)
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(ids_t, positions, meta))
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-4)


@pytest.mark.slow  # SmolLM2 through peft or the engine: `make test`
def test_adalora_serves_per_request_as_the_lora_update_it_computes(smollm_runs, smollm_gguf):
    """An AdaLoRA adapter reads as LoRA (A * E scaled, B; kept ranks per layer): the engine applies it per
    request, with the merged model's greedy tokens."""
    directory = smollm_runs.runs["adalora"].dir
    adapter = read_adapter(directory)
    assert adapter.kind == "ADALORA" and {a.shape[0] for a, _ in adapter.lora.values()} <= set(range(1, 7))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    merged = LLM(str(directory), verbose=False).generate([PROMPT], params)[0].outputs[0].token_ids
    llm = LLM(smollm_gguf, lora={"ada": str(directory)}, verbose=False)
    routed = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, lora="ada"))[0].outputs[0].token_ids
    plain = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    assert routed == merged != plain


def test_bottleneck_adapter_round_trips_and_serves_unmerged(bert_runs, minilm_dir, seqs):
    ours = bert_runs["adapter"]
    assert (ours.dir / "adapter_config.json").read_text().count('"BOTTLENECK"') == 1
    loaded = load_model(str(ours.dir))
    wrapped = [n for n, m in loaded.model.named_modules() if isinstance(m, BottleneckLinear)]
    assert len(wrapped) == 12  # after the attention output and the feed-forward output of 6 layers
    torch.testing.assert_close(classify_logits(loaded.model, seqs), ours.logits, atol=1e-5, rtol=1e-5)
    # lmk eval's path: the classifier through LLM.classify
    llm = LLM(str(ours.dir), verbose=False)
    probs = llm.classify(["Profit rose sharply in the quarter."])
    assert len(probs) == 1


@pytest.mark.slow  # SmolLM2 through peft or the engine: `make test`
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_token_decoders_are_refused_by_the_engine_with_a_clear_error(kind, smollm_runs):
    with pytest.raises(LmkError, match=f"{kind}-tuning adapter adds 20 virtual tokens.*lmk lora merge"):
        LLM(str(smollm_runs.runs[kind].dir), verbose=False)


def test_prefix_tuning_refuses_an_encoder(minilm_dir):
    with pytest.raises(AdapterError, match="prefix tuning runs on Llama-family decoders"):
        start(minilm_classifier(minilm_dir, seed=5), PeftSettings.parse("prefix", ""), ["classifier"], 0, 10)


def test_peft_args_are_checked():
    with pytest.raises(AdapterError, match="target_r"):
        PeftSettings.parse("adalora", "r=4,target_r=8")
    with pytest.raises(AdapterError, match="tokens"):
        PeftSettings.parse("prompt", "tokens=0")
    with pytest.raises(AdapterError, match="size=..."):
        PeftSettings.parse("ia3", "size=3")
    with pytest.raises(AdapterError, match="one of"):
        PeftSettings.parse("bitfit", "")


def test_lmk_lora_merge_folds_ia3_and_adalora_and_refuses_what_cannot_merge(bert_runs, minilm_dir, seqs, tmp_path):
    from lmkernel.train.lora import merge_adapter_dir

    for kind in ("ia3", "adalora"):
        out = merge_adapter_dir(str(minilm_dir), bert_runs[kind].dir, tmp_path / kind)
        merged = load_model(out)
        assert merged.config.id2label == LABELS
        torch.testing.assert_close(classify_logits(merged.model, seqs), bert_runs[kind].logits, atol=1e-4, rtol=1e-4)
    for kind in ("prompt", "adapter"):
        with pytest.raises(AdapterError, match="no merge folds"):
            merge_adapter_dir(str(minilm_dir), bert_runs[kind].dir, tmp_path / kind)
        assert not (tmp_path / kind).exists()


@pytest.mark.slow  # SmolLM2 through peft or the engine: `make test`
def test_a_bottleneck_decoder_is_served_unmerged_by_the_engine(smollm_gguf, tmp_path):
    """A bottleneck adapter on SmolLM2 (random, so it matters) generates through the paged engine the
    tokens the whole-sequence forward predicts."""
    lm = load_model(smollm_gguf, quantization=None)
    run = start(lm.model, PeftSettings.parse("adapter", "size=8"), [], seed=0, total_steps=1)
    _randomize(run.model, seed=3)
    directory = run.save(tmp_path / "adapter", "smollm2-135m-instruct", "CAUSAL_LM", [], "LlamaForCausalLM", None)
    llm = LLM(str(directory), verbose=False)
    assert any(isinstance(m, BottleneckLinear) for m in llm.loaded.model.modules())
    tokens = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0].token_ids
    ids = lm.tokenizer.encode(PROMPT)
    expected = []
    for _ in range(6):
        ids_t, positions, meta = flatten([ids + expected], causal=True)
        with torch.no_grad():
            expected.append(int(run.model.compute_logits(run.model(ids_t, positions, meta))[-1].argmax()))
    assert tokens == expected


@pytest.mark.slow  # a training run on SmolLM2
def test_a_decoder_classifier_trains_with_lora_by_default_and_peft_reads_it(smollm_gguf, tmp_path, phrasebank_sentences):
    """`--task classify` on a decoder: a new `score` head on the last token, LoRA unless told otherwise; the
    saved adapter gives transformers' LlamaForSequenceClassification (through peft) the same logits."""
    import json

    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lmkernel.loader.hf_export import hf_config
    from lmkernel.train.args import TrainArgs
    from lmkernel.train.trainer import train
    from shared_paths import SHARED_DATA

    rows = (SHARED_DATA / "financial-phrasebank" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(rows[:24]), encoding="utf-8")
    args = TrainArgs(task="classify", model="smollm2-135m-instruct", data=str(data), output=str(tmp_path / "run"),
                     max_steps=3, batch_size=8, warmup=0).check()
    result = train(args)
    config = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["modules_to_save"]) == ("LORA", "SEQ_CLS", ["score"])
    assert result.trainable_parameters < 10_000_000  # LoRA and the head, not the 135M of the model
    tuned = load_model(args.output)
    assert tuned.config.hf_architecture == "LlamaForSequenceClassification" and len(tuned.config.id2label) == 3
    seqs = tuned.tokenizer.encode_batch(phrasebank_sentences[:4])
    ours = []
    for s in seqs:
        ids, positions, meta = flatten([s], causal=True)
        with torch.no_grad():
            ours.append(tuned.model.classify(tuned.model(ids, positions, meta), meta)[0])
    batched = LLM(args.output, verbose=False).classify(phrasebank_sentences[:4])  # one varlen batch, causal
    torch.testing.assert_close(torch.tensor([list(b.probs.values()) for b in batched]),
                               torch.stack(ours).softmax(-1), atol=1e-4, rtol=1e-4)
    base = load_model(smollm_gguf, quantization=None)
    hf_cfg = LlamaConfig(**hf_config(base.config, torch.float32), num_labels=3)
    with torch.device("meta"):
        hf = LlamaForSequenceClassification(hf_cfg)
    state = {k: v for k, v in base.model.state_dict().items() if not k.startswith("lm_head")}
    state["score.weight"] = torch.zeros(3, base.config.hidden_size)
    hf.load_state_dict(state, strict=True, assign=True)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg)
    peft_model = PeftModel.from_pretrained(hf.eval(), tmp_path / "run" / "model").eval()
    with torch.no_grad():
        theirs = torch.cat([peft_model(input_ids=torch.tensor([s])).logits for s in seqs])
    torch.testing.assert_close(torch.stack(ours), theirs, atol=1e-3, rtol=1e-4)
