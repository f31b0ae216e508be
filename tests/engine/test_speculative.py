"""Speculative decoding: prompt lookup, the check of proposals (greedy and sampled), and an engine that
speculates giving the tokens plain decoding gives, on the real SmolLM2 and a k-quant Llama."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lmkernel.config import EngineConfig, EngineConfigError, SpeculativeConfig
from lmkernel.engine.llm import LLM
from lmkernel.engine.request import Request
from lmkernel.engine.sampling import Sampler, SamplingParams
from lmkernel.engine.speculative import lookup, verify
from lmkernel.engine.structured import StructuredOutputs
from lmkernel.memory.kv_cache import bytes_per_block

# --- prompt lookup ------------------------------------------------------------------------------------------


def test_lookup_copies_what_followed_the_latest_earlier_occurrence() -> None:
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup(seq, 2, 4, 2) == [7, 8]
    assert lookup(seq, 2, 4, 5) == [7, 8, 5, 1, 2]


def test_lookup_prefers_the_longest_ngram_then_shorter_ones() -> None:
    seq = [5, 3, 4, 0, 9, 3, 4, 6, 5, 3, 4]
    assert lookup(seq, 2, 3, 1) == [0]  # [5, 3, 4] occurred at the start
    assert lookup(seq, 2, 2, 1) == [6]  # [3, 4] occurred last before 6


def test_lookup_without_an_earlier_occurrence_proposes_nothing() -> None:
    assert lookup([1, 2, 3, 4], 2, 4, 3) == []
    assert lookup([1, 2], 2, 4, 3) == []
    assert lookup([1, 2, 7, 1, 2], 2, 4, 5) == [7, 1, 2]  # only what the sequence holds


# --- the check ----------------------------------------------------------------------------------------------


def _request(tokens: list[int], num_prompt: int, **params) -> Request:
    request = Request("r", tokens[:num_prompt], SamplingParams(max_tokens=50, **params), 0)
    request.token_ids = list(tokens)
    return request


def _rows(*best: int, vocab: int = 6) -> torch.Tensor:
    """Logits rows whose argmax is `best[i]`, with the runner-up a clear second."""
    rows = torch.zeros(len(best), vocab)
    for i, b in enumerate(best):
        rows[i, b] = 5.0
        rows[i, (b + 1) % vocab] = 3.0
    return rows


def _nothing(i: int) -> list[int]:
    return []


def test_greedy_check_keeps_proposals_while_each_is_the_models_choice() -> None:
    sampler, request = Sampler(0), _request([0, 1, 2], 2, temperature=0)
    logits = _rows(3, 4, 1, 2)
    assert verify(sampler, logits, request, [3, 4, 5], None, _nothing, lambda i: None) == [3, 4, 1]
    assert verify(sampler, logits, request, [3, 4, 1], None, _nothing, lambda i: None) == [3, 4, 1, 2]
    assert verify(sampler, logits, request, [0, 4, 1], None, _nothing, lambda i: None) == [3]
    assert request.token_ids == [0, 1, 2]  # the check leaves the request as it was


def test_greedy_check_applies_min_tokens_and_grammar_row_by_row() -> None:
    sampler, request = Sampler(0), _request([0, 1], 1, temperature=0)
    logits = _rows(5, 5, 5)
    # Token 5 may not end the output before row 1; row 0 takes the runner-up (0), rows after it may take 5.
    assert verify(sampler, logits, request, [0, 5], None, lambda i: [5] if i < 1 else [], lambda i: None) == [0, 5, 5]
    only_two = torch.zeros(6, dtype=torch.bool)
    only_two[2] = True
    assert verify(sampler, logits, request, [5, 5], None, _nothing, lambda i: only_two if i == 1 else None) == [5, 2]


def test_sampled_check_draws_exactly_from_the_models_distribution() -> None:
    """Rejection against a point-mass proposal keeps each token's probability: the first token follows row 0's
    distribution, and after a kept proposal the next follows row 1's."""
    sampler, request = Sampler(0), _request([0, 1], 1, temperature=1.0)
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p1 = torch.tensor([0.5, 0.1, 0.1, 0.3])
    logits = torch.stack([p0.log(), p1.log(), p1.log()])
    generator = torch.Generator().manual_seed(7)
    firsts, seconds = Counter(), Counter()
    trials = 6000
    for _ in range(trials):
        out = verify(sampler, logits, request, [2, 0], generator, _nothing, lambda i: None)
        firsts[out[0]] += 1
        if out[0] == 2:
            seconds[out[1]] += 1
    for t in range(4):
        assert abs(firsts[t] / trials - float(p0[t])) < 0.025, (t, firsts)
        assert abs(seconds[t] / firsts[2] - float(p1[t])) < 0.04, (t, seconds)


# --- settings -----------------------------------------------------------------------------------------------


def test_speculative_settings_are_parsed_and_checked_with_their_flags() -> None:
    assert EngineConfig().speculative is None
    assert EngineConfig(speculative="ngram").speculative == SpeculativeConfig("ngram")
    spec = EngineConfig(speculative={"model": "ngram", "num_speculative_tokens": 5}).speculative
    assert spec.num_speculative_tokens == 5 and spec.is_ngram
    for bad, flag in (({"model": "ngram", "num_speculative_tokens": 0}, "--num-speculative-tokens"),
                      ({"model": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "--prompt-lookup-max"),
                      ({"model": " "}, "--speculative-model"),
                      ({"num_speculative_tokens": 3}, "'model' is missing"),
                      ({"model": "ngram", "k": 3}, "unknown setting 'k'")):
        with pytest.raises(EngineConfigError, match=flag):
            EngineConfig(speculative=bad)


# --- the engine on real models ------------------------------------------------------------------------------

COPY_PROMPT = ("Copy this list exactly, then say done.\nList: red apple, green pear, yellow lemon, purple plum, "
               "orange peach, black cherry, white grape.\nCopy: red apple,")


@pytest.fixture(scope="module")
def prompts(smollm, wikitext_ids: list[int]) -> list[list[int]]:
    copy = smollm.tokenizer.encode(COPY_PROMPT)
    return [copy, wikitext_ids[:40], wikitext_ids[300:330] + wikitext_ids[300:330], copy[:20] + copy]


def _llm(smollm, blocks: int = 96, **spec) -> LLM:
    per_block = bytes_per_block(smollm.config, 16, torch.float32)
    speculative = {"model": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 8, **spec} if spec else None
    # No prefix cache: a prompt found there keeps K/V another chunking computed, which can move logits by an
    # ulp whether or not the engine speculates; these tests compare the two bit for bit.
    return LLM(smollm, kv_cache_memory=blocks * per_block, max_num_batched_tokens=256, enable_prefix_caching=False,
               verbose=False, speculative=speculative)


@pytest.fixture(scope="module")
def plain(smollm) -> LLM:
    return _llm(smollm)


@pytest.fixture(scope="module")
def ngram(smollm) -> LLM:
    return _llm(smollm, model="ngram")


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_prompt_lookup_gives_plain_decodings_tokens_alone_and_in_a_batch(plain, ngram, prompts) -> None:
    expected = _ids(plain.generate(prompts, GREEDY))
    before = ngram.stats()
    alone = [_ids(ngram.generate([p], GREEDY))[0] for p in prompts]
    stats = ngram.stats()
    assert alone == expected
    assert stats["spec_accepted_tokens"] - before["spec_accepted_tokens"] > 20, "the copying prompts accept proposals"
    assert stats["spec_tokens_per_check"] > 1.5
    assert _ids(ngram.generate(prompts, GREEDY)) == expected
    assert ngram.stats()["kv_blocks_free"] == ngram.stats()["kv_blocks_total"], "rejected proposals' blocks came back"


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_a_draft_model_gives_plain_decodings_tokens(smollm, smollm_gguf, plain, prompts) -> None:
    """SmolLM2's kept GGUF drafting for its float self: most proposals pass, and the output is the target's."""
    expected = _ids(plain.generate(prompts, GREEDY))
    llm = _llm(smollm, model=str(smollm_gguf), num_speculative_tokens=4)
    assert llm.stats()["speculative"] == "draft model, 4 tokens"
    assert _ids(llm.generate(prompts, GREEDY)) == expected
    assert [_ids(llm.generate([p], GREEDY))[0] for p in prompts[:2]] == expected[:2]
    assert llm.stats()["spec_acceptance_rate"] > 0.6


def test_a_draft_model_of_another_vocabulary_is_refused(smollm, tiny_llama, tmp_path) -> None:
    from tiny_gguf import write_llama_gguf

    other = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    with pytest.raises(EngineConfigError, match="--speculative-model .* share the target's vocabulary"):
        _llm(smollm, model=str(other))


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_stops_max_tokens_and_logprobs_are_those_of_plain_decoding(plain, ngram, prompts) -> None:
    for params in (SamplingParams(temperature=0, max_tokens=13, ignore_eos=True, logprobs=2),
                   SamplingParams(temperature=0, max_tokens=60, stop=["plum"]),
                   SamplingParams(temperature=0, max_tokens=60, min_tokens=30)):
        want, got = plain.generate(prompts[:1], params)[0].outputs[0], ngram.generate(prompts[:1], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)
        if params.logprobs is not None:
            assert len(got.logprobs) == 13
            for a, b in zip(got.logprobs, want.logprobs):
                assert a.keys() == b.keys()
                assert all(a[t].logprob == b[t].logprob for t in a)  # the same arithmetic, bit for bit


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_structured_output_checks_proposals_against_the_grammar(plain, ngram) -> None:
    schema = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
              "required": ["fruits"]}
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputs(json=schema))
    prompt = "Return JSON listing these fruits: apple, pear, apple, pear, apple, pear.\n"
    want, got = plain.generate([prompt], params)[0].outputs[0], ngram.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == want.token_ids
    if got.finish_reason == "stop":
        json.loads(got.text)


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_sampled_requests_with_speculation_stay_seeded_and_finish(ngram, prompts) -> None:
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)
    first, second = _ids(ngram.generate(prompts[:2], params)), _ids(ngram.generate(prompts[:2], params))
    assert first == second and all(len(t) == 30 for t in first)


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_preempted_speculating_requests_still_give_plain_tokens(smollm, plain, prompts) -> None:
    """A cache too small for every sequence at once: sequences are preempted and recomputed mid-speculation."""
    expected = _ids(plain.generate(prompts, GREEDY))
    small = _llm(smollm, blocks=14, model="ngram")
    assert _ids(small.generate(prompts, GREEDY)) == expected
    assert small.stats()["preemptions"] > 0


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_speculation_pauses_when_the_batch_is_full(smollm, plain, prompts) -> None:
    llm = _llm(smollm, model="ngram", disable_by_batch_size=2)
    assert _ids(llm.generate(prompts, GREEDY)) == _ids(plain.generate(prompts, GREEDY))
    assert llm.stats()["spec_paused_rows"] > 0


def test_k_quant_blocks_check_with_the_arithmetic_of_plain_decoding(tiny_llama, tmp_path) -> None:
    """Q4_K / Q6_K layers: a step's proposal rows get a plain decode row's integer sums (8 + 6-bit activations,
    the fused decoder's vector kernel), so greedy output is identical even where two tokens nearly tie."""
    from gguf import GGMLQuantizationType as T
    from tiny_gguf import write_llama_gguf

    from lmkernel import load_model

    types = {f"blk.{i}.{n}.weight": T.Q4_K for i in range(2) for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up")}
    types |= {f"blk.{i}.{n}.weight": T.Q6_K for i in range(2) for n in ("attn_v", "attn_output", "ffn_down")}
    loaded = load_model(write_llama_gguf(tmp_path / "kq.gguf", tiny_llama, types), packed_cache=None)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, loaded.config.vocab_size, (12,), generator=rng).tolist() * 2 for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(loaded, kv_cache_memory="8MiB", verbose=False)
    spec = LLM(loaded, kv_cache_memory="8MiB", verbose=False,
               speculative={"model": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    assert spec.stats()["decode_backend"] == "fused"
    expected = [_ids(plain.generate([p], params))[0] for p in prompts]
    assert [_ids(spec.generate([p], params))[0] for p in prompts] == expected
    assert spec.stats()["spec_checks"] > 0


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_requests_on_a_lora_adapter_check_proposals_through_it(smollm, prompts, tmp_path) -> None:
    from lora_checks import random_llama_adapter

    adapter = {"a": random_llama_adapter(tmp_path / "a", smollm.config, seed=1)}
    kw = dict(kv_cache_memory="32MiB", enable_prefix_caching=False, verbose=False, lora=adapter)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, lora="a")
    expected = _ids(LLM(smollm, **kw).generate(prompts[:1], params))
    llm = LLM(smollm, **kw, speculative={"model": "ngram", "num_speculative_tokens": 3})
    assert _ids(llm.generate(prompts[:1], params)) == expected
    assert llm.stats()["spec_checks"] > 0


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_with_the_prefix_cache_proposals_never_leave_blocks_others_find(smollm, prompts) -> None:
    """Prefix caching on: blocks holding proposals are never registered, and the blocks a speculating request
    leaves hold what plain decoding would have left, so a later request that shares its text finds the same
    K/V and generates the same tokens with and without speculation."""
    def session(spec: dict | None) -> list[list[int]]:
        llm = LLM(smollm, kv_cache_memory="32MiB", verbose=False, speculative=spec)
        first = _ids(llm.generate(prompts[:1], GREEDY))[0]
        again = _ids(llm.generate([prompts[0] + first[:20]], SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)))[0]
        assert llm.stats()["prefix_cache_hits"] > 0
        return [first, again]

    assert session({"model": "ngram", "num_speculative_tokens": 3}) == session(None)
