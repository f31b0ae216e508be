"""The engine end to end on SmolLM2: paged, chunked, preempted and prefix-cached generation must equal
the plain reference path; sampling, stops, aborts and limits behave as documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmkernel import LLM, LmkError, SamplingParams, load_model
from lmkernel.errors import AdapterError
from lmkernel.layers.lora import MultiLoraLinear
from lmkernel.memory.kv_cache import bytes_per_block

BLOCK = 16
KV_BLOCKS = 96  # 1,536 token slots: far less than 32 prompts need together, so requests get preempted


@pytest.fixture(scope="module")
def llm(smollm) -> LLM:
    per_block = bytes_per_block(smollm.config, BLOCK, torch.float32)
    return LLM(smollm, kv_cache_memory=KV_BLOCKS * per_block, max_num_batched_tokens=128, max_num_seqs=16, verbose=False)


def test_prompt_logprobs_equal_reference(llm, smollm, wikitext_ids):
    prompt = wikitext_ids[:300]  # longer than the step budget: scored across several chunks
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ref = torch.log_softmax(smollm.logits(prompt), -1)
    worst = 0.0
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        token = prompt[pos]
        assert token in entry and len(entry) >= 3
        worst = max(worst, abs(entry[token].logprob - ref[pos - 1, token].item()))
        top = ref[pos - 1].topk(3).indices.tolist()
        assert set(top) <= set(entry)
    assert worst <= 1e-4, worst


def test_seeded_sampling_ignores_batch_composition(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=1234)
    alone = llm.generate(["The history of the lobster"], params)[0].outputs[0].token_ids
    crowd = ["Another prompt entirely", "The history of the lobster", "A third one, longer than the others by far"]
    mixed = llm.generate(crowd, [SamplingParams(temperature=1.0, max_tokens=20), params, SamplingParams(temperature=0.7, max_tokens=5)])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(["The history of the lobster"], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_string_is_cut_exactly(llm):
    prompt = "The European lobster is"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    stop = free[8:12]
    assert stop.strip() and free.find(stop) == 8
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == free[:8] and out.finish_reason == "stop" and out.stop_reason == stop


def test_n_samples_share_the_prompt_and_differ(llm):
    out = llm.generate(["Write a word:"], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, logprobs=2))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for token, entry in zip(o.token_ids, o.logprobs):
            assert token in entry and entry[token].logprob <= 0 and entry[token].rank >= 1


def test_bad_sampling_values_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)


def test_chat_applies_the_template(llm, smollm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=8))[0]
    expected = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=True)
    assert out.prompt_token_ids == expected and out.outputs[0].text


def test_encoder_api(minilm, st_minilm, phrasebank_sentences):
    """LLM.embed on an encoder gives sentence-transformers' embeddings of the same files (unit length, as the
    model's Normalize module makes them), in batches of any size; generate and classify are refused by name."""
    enc = LLM(minilm, verbose=False)
    texts = phrasebank_sentences[100:110]
    vectors = enc.embed(texts)
    expected = torch.from_numpy(st_minilm.encode(texts, convert_to_numpy=True))
    assert vectors.shape == (10, 384)
    torch.testing.assert_close(vectors, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(10))
    torch.testing.assert_close(enc.embed(texts[3]), vectors[3:4], atol=2e-6, rtol=1e-5)  # alone as in the batch
    with pytest.raises(LmkError, match="decoder"):
        enc.generate(["hi"])
    with pytest.raises(LmkError, match="classification"):
        enc.classify(["hi"])


def test_classify_matches_transformers(tmp_path, minilm_dir, hf_minilm_tokenizer, phrasebank_sentences):
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    ref = BertForSequenceClassification(config).eval()
    ref.save_pretrained(tmp_path)
    shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    texts = phrasebank_sentences[:12]
    got = LLM(str(tmp_path), verbose=False).classify(texts)
    batch = hf_minilm_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = ref(**batch).logits.softmax(-1)
    for out, row in zip(got, probs):
        assert set(out.probs) == set(labels.values())
        torch.testing.assert_close(torch.tensor([out.probs[labels[i]] for i in range(3)]), row, atol=1e-5, rtol=0)
        assert out.label == labels[int(row.argmax())]


def test_min_tokens_holds_back_eos(llm):
    chat = [{"role": "user", "content": "Reply with the single word yes."}]
    natural = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == llm.tokenizer.eos_token_id
    k = len(natural.token_ids)
    longer = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=k + 3))[0].outputs[0]
    assert len(longer.token_ids) >= k + 3
    assert llm.tokenizer.eos_token_id not in longer.token_ids[: k + 2]


def test_top_k_one_is_greedy_and_penalties_change_the_choice(llm):
    prompt = ["one two one two one two one two one"]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    top1 = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, seed=3))[0].outputs[0].token_ids
    assert top1 == greedy
    for penalty in (dict(repetition_penalty=2.0), dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        other = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, **penalty))[0].outputs[0].token_ids
        assert other != greedy, penalty


@pytest.fixture(scope="module")
def adapters(smollm, tmp_path_factory) -> dict[str, Path]:
    from lora_checks import random_llama_adapter

    root = tmp_path_factory.mktemp("lora")
    return {"a": random_llama_adapter(root / "a", smollm.config, seed=1),
            "b": random_llama_adapter(root / "b", smollm.config, seed=2, targets=("k_proj", "o_proj", "up_proj"))}


@pytest.fixture(scope="module")
def lora_llm(smollm, adapters) -> LLM:
    return LLM(smollm, kv_cache_memory="64MiB", max_num_batched_tokens=128, verbose=False, lora=adapters)


def _greedy_matches(reference, prompt: list[int], generated: list[int]) -> bool:
    """Whether `generated` is the reference's greedy continuation, allowing a flip at a near tie."""
    ref = torch.log_softmax(reference.logits(prompt + generated)[len(prompt) - 1 : -1], -1)
    best = ref.argmax(-1).tolist()
    if best == generated:
        return True
    first = next(i for i, (a, b) in enumerate(zip(best, generated)) if a != b)
    top2 = ref[first].topk(2).values
    return (top2[0] - top2[1]).item() <= 1e-3


def test_lora_generation_equals_the_merged_model(lora_llm, adapters, smollm, wikitext_ids):
    merged = load_model(adapters["a"])  # the adapter directory as a model: the base it names, adapter merged
    assert not any(isinstance(m, MultiLoraLinear) for m in smollm.model.modules())  # the caller's model untouched
    assert any(isinstance(m, MultiLoraLinear) for m in lora_llm.loaded.model.modules())
    prompts = [wikitext_ids[:40], wikitext_ids[100:300]]  # the second is prefilled in chunks of the 128-token budget
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, lora="a")
    outs = lora_llm.generate(prompts, params)
    base = lora_llm.generate(prompts, dataclasses.replace(params, lora=None))
    for prompt, out, plain in zip(prompts, outs, base):
        assert _greedy_matches(merged, prompt, out.outputs[0].token_ids)
        assert out.outputs[0].token_ids != plain.outputs[0].token_ids  # the adapter matters


def test_batch_mixing_adapters_and_the_base_gives_each_its_own_tokens(lora_llm, wikitext_ids):
    names = [None, "a", "b", "a", None, "b"]
    # The same prompt under the base and both adapters (same step, no shared blocks), and other lengths.
    prompts = [wikitext_ids[:40]] * 3 + [wikitext_ids[50:50 + n] for n in (20, 77, 33)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora=n) for n in names]
    alone = [lora_llm.generate([p], q)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    mixed = lora_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in mixed] == alone
    assert len({tuple(t) for t in alone[:3]}) == 3  # base, a and b differ


def test_prefix_cache_is_not_shared_across_adapters(lora_llm, wikitext_ids):
    prompt = wikitext_ids[600:664]  # four full blocks; three can be reused (one token is always computed)
    pool = lora_llm.engine.pool
    runs = {}
    for name in (None, "a", "b", "a"):
        before = pool.stats.hits
        runs.setdefault(name, []).append(
            lora_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, lora=name))[0].outputs[0].token_ids)
        runs[name].append(pool.stats.hits - before)
    assert runs[None][1] == 0 and runs["a"][1] == 0 and runs["b"][1] == 0  # a different adapter misses
    assert runs["a"][3] == 3 * BLOCK and runs["a"][2] == runs["a"][0]  # the same adapter hits, with equal tokens


def test_unknown_adapter_is_a_clear_error(lora_llm, llm, smollm, tmp_path):
    with pytest.raises(LmkError, match="LoRA adapter 'c' is not loaded; this engine serves: a, b"):
        lora_llm.generate(["Hi"], SamplingParams(lora="c"))
    with pytest.raises(LmkError, match="serves no LoRA adapters"):
        llm.generate(["Hi"], SamplingParams(lora="a"))
    with pytest.raises(ValueError, match="SamplingParams.lora"):
        SamplingParams(lora="")
    with pytest.raises(AdapterError, match=f"{tmp_path / 'missing'}: no adapter_config.json"):
        LLM(smollm, verbose=False, lora={"x": tmp_path / "missing"})
    assert lora_llm.stats()["running"] == 0 and lora_llm.stats()["waiting"] == 0
