"""LoRA training side on the real models: adapters we save give peft's logits on transformers'
models and adapters peft saves give ours; merging changes nothing; only A, B and modules_to_save train;
`lmk lora merge` writes a model lmkernel and transformers both load."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from lora_checks import LABELS, classify_logits, hf_classify_logits, hf_llama, minilm_classifier, randomize_lora
from model_checks import flatten

from lmkernel import LLM, load_model
from lmkernel.engine.adapters import shared_copy
from lmkernel.errors import AdapterError
from lmkernel.layers.linear import Dense
from lmkernel.layers.lora import LoraLinear
from lmkernel.train.lora import LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def llama(smollm_gguf, tmp_path_factory):
    """A fresh SmolLM2 with LoRA on every projection (random B, so it matters), saved by us."""
    lm = load_model(smollm_gguf, quantization=None)
    ids = lm.tokenizer.encode(PROMPT)
    base_logits = lm.logits(ids)
    base_state = dict(lm.model.state_dict())
    untouched = shared_copy(lm.model)  # the same weights, without the wrappers apply_lora adds
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0)
    names = apply_lora(lm.model, settings, seed=0)
    randomize_lora(lm.model, seed=1, scale=0.02)
    directory = save_adapter(lm.model, settings, tmp_path_factory.mktemp("llama") / "adapter", "smollm2-135m-instruct",
                             "CAUSAL_LM")
    return SimpleNamespace(lm=lm, ids=ids, base=base_logits, state=base_state, untouched=untouched, names=names,
                           dir=directory, logits=lm.logits(ids))


def _hf_from(state: dict[str, torch.Tensor], config):
    return hf_llama(SimpleNamespace(state_dict=lambda: state), config)


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_llama_adapter_we_save_gives_peft_s_logits(llama):
    from peft import PeftModel

    assert len(llama.names) == llama.lm.config.num_layers * 7 and "lm_head" not in llama.names
    assert (llama.logits - llama.base).abs().max() > 1.0  # the adapter changes the model
    peft_model = PeftModel.from_pretrained(_hf_from(llama.state, llama.lm.config), llama.dir).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([llama.ids])).logits[0]
    torch.testing.assert_close(llama.logits, theirs, atol=1e-3, rtol=1e-4)


def test_llama_adapter_peft_saves_loads_with_the_same_logits(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                        rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 4})
    peft_model = get_peft_model(_hf_from(llama.state, llama.lm.config), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([llama.ids])).logits[0]
    model = shared_copy(llama.untouched)
    names = load_adapter(model, tmp_path)
    assert len(names) == llama.lm.config.num_layers * 3 and all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
    ours = dataclasses.replace(llama.lm, model=model).logits(llama.ids)
    assert (ours - llama.base).abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


def test_merged_model_gives_the_adapter_s_logits(llama):
    model = shared_copy(llama.lm.model)
    merged = merge_lora(model)
    assert sorted(merged) == sorted(llama.names)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is Dense for n in merged)
    torch.testing.assert_close(dataclasses.replace(llama.lm, model=model).logits(llama.ids), llama.logits, atol=1e-4, rtol=1e-5)


# -- BERT classification ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(minilm_dir, minilm, phrasebank_sentences, tmp_path_factory):
    """all-MiniLM-L6-v2 as a classifier with default LoRA targets and a trained-and-saved classifier."""
    model = minilm_classifier(minilm_dir, seed=5)
    settings = LoraSettings()
    names = apply_lora(model, settings, modules_to_save=["classifier"], seed=0)
    randomize_lora(model, seed=2, scale=0.05)
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    directory = save_adapter(model, settings, tmp_path_factory.mktemp("bert") / "adapter", str(minilm_dir), "SEQ_CLS",
                             ["classifier"], id2label=LABELS)
    seqs = minilm.tokenizer.encode_batch(phrasebank_sentences[:8])
    return SimpleNamespace(model=model, names=names, dir=directory, seqs=seqs, logits=classify_logits(model, seqs))


def test_bert_default_targets_are_the_encoder_projections(bert):
    assert len(bert.names) == 6 * 6
    assert not any("pooler" in n or n == "classifier" for n in bert.names)
    assert {n.split("layer.0.", 1)[1] for n in bert.names if ".layer.0." in n} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"}


def test_bert_classification_adapter_we_save_gives_peft_s_logits(bert, minilm_dir):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    theirs = hf_classify_logits(PeftModel.from_pretrained(hf, bert.dir).eval(), bert.seqs)
    torch.testing.assert_close(bert.logits, theirs, atol=1e-4, rtol=1e-4)
    # The directory is a model too: the base it names, a classifier with the labels, the adapter merged.
    llm = LLM(str(bert.dir), verbose=False)
    assert llm.loaded.config.id2label == LABELS
    torch.testing.assert_close(classify_logits(llm.loaded.model, bert.seqs), bert.logits, atol=1e-4, rtol=1e-4)


def test_bert_adapter_peft_saves_loads_with_the_same_logits(bert, minilm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path)  # no sidecar: the architecture follows from task_type SEQ_CLS
    theirs = hf_classify_logits(peft_model.eval(), bert.seqs)
    loaded = load_model(minilm_dir, adapter=tmp_path)
    assert loaded.config.hf_architecture == "BertForSequenceClassification"
    assert loaded.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    torch.testing.assert_close(classify_logits(loaded.model, bert.seqs), theirs, atol=1e-4, rtol=1e-4)


def test_bare_encoder_adapter_uses_peft_s_names_for_a_bert_model(minilm_dir, bert, tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    lm = load_model(minilm_dir)  # a bare BertModel: Hugging Face names it `encoder...`, we `bert.encoder...`
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    apply_lora(lm.model, settings, seed=0)
    randomize_lora(lm.model, seed=4, scale=0.1)
    save_adapter(lm.model, settings, tmp_path / "a", str(minilm_dir), "FEATURE_EXTRACTION")
    ids, positions, meta = flatten(bert.seqs, causal=False)
    with torch.no_grad():
        ours = lm.model(ids, positions, meta)
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(minilm_dir, add_pooling_layer=False), tmp_path / "a")
    width = max(map(len, bert.seqs))
    padded = torch.tensor([s + [0] * (width - len(s)) for s in bert.seqs])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in bert.seqs])[:, None]).long()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=padded, attention_mask=mask).last_hidden_state[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    merged = load_model(tmp_path / "a")  # the directory as a model: embeddings with the adapter merged
    torch.testing.assert_close(merged.embed_token_ids(bert.seqs), lm.embed_token_ids(bert.seqs), atol=1e-5, rtol=1e-5)


def test_one_optimizer_step_changes_only_lora_and_the_saved_head(minilm_dir, bert):
    model = minilm_classifier(minilm_dir, seed=5)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1), modules_to_save=["classifier"], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in bert.names for x in "AB"} | {"classifier.weight", "classifier.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    ids, positions, meta = flatten(bert.seqs, causal=False)
    loss = torch.nn.functional.cross_entropy(model.classify(model(ids, positions, meta), meta), torch.arange(8) % 3)
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in trainable if n.endswith("lora_B") or n.startswith("classifier")} <= changed <= trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lmk_lora_merge_writes_a_model_lmkernel_and_transformers_load(bert, minilm_dir, tmp_path):
    from test_cli import invoke
    from transformers import AutoModelForSequenceClassification

    out = invoke("lora", "merge", str(minilm_dir), str(bert.dir), "-o", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    merged = load_model(tmp_path / "merged")
    assert merged.config.hf_architecture == "BertForSequenceClassification" and merged.config.id2label == LABELS
    assert not any(isinstance(m, LoraLinear) for m in merged.model.modules())
    torch.testing.assert_close(classify_logits(merged.model, bert.seqs), bert.logits, atol=1e-4, rtol=1e-4)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.id2label == LABELS
    torch.testing.assert_close(hf_classify_logits(hf, bert.seqs), bert.logits, atol=1e-4, rtol=1e-4)
    again = invoke("lora", "merge", str(minilm_dir), str(bert.dir), "-o", str(tmp_path / "merged"))
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = invoke("lora", "merge", str(minilm_dir), str(tmp_path / "nothing"), "-o", str(tmp_path / "m2"))
    assert bad.returncode == 1 and "nothing" in bad.stderr and "adapter_config.json" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "m2").exists()


def test_settings_parse_and_refuse_bad_specs():
    assert LoraSettings.parse("r=16,alpha=32,dropout=0.1,targets=q_proj+v_proj") == LoraSettings(16, 32.0, 0.1, ("q_proj", "v_proj"))
    assert LoraSettings.parse("") == LoraSettings() and LoraSettings.parse(" r = 4 ").r == 4
    for spec, fragment in (("rank=4", "'rank=4' is not one of"), ("r=four", "r=four is not a number"),
                           ("r=0", "r must be a positive integer"), ("dropout=1", "dropout must be in"),
                           ("alpha=-1", "alpha must be a positive"), ("targets=", "'targets=' is not one of")):
        with pytest.raises(AdapterError, match=fragment):
            LoraSettings.parse(spec)


def test_apply_lora_refuses_targets_and_modules_the_model_lacks(minilm_dir):
    model = minilm_classifier(minilm_dir, seed=5)
    with pytest.raises(AdapterError, match=r"\('q_proj',\) match no linear layer of this bert model .*query"):
        apply_lora(model, LoraSettings(target_modules=("q_proj",)))
    with pytest.raises(AdapterError, match="modules_to_save: .* has no module 'score'"):
        apply_lora(model, LoraSettings(), modules_to_save=["score"])
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing was wrapped
