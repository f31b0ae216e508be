"""--deterministic (EngineConfig.deterministic): a request's tokens and log-probs do not depend on its batch, on
how its prompt was chunked, or on whether its prefix came from the cache."""

from __future__ import annotations

import pytest

from lmkernel.bench.deterministic import CONDITIONS, MEASURED_PROMPTS, invariance
from lmkernel.config import EngineConfigError
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams


def _all_same(found) -> None:
    assert found.same_logprobs == {c: found.prompts for c in CONDITIONS}, found


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_dense_float_model_answers_alone_batched_chunked_and_cached_alike(smollm) -> None:
    _all_same(invariance(smollm, MEASURED_PROMPTS[:4], 12, "64MiB", deterministic=True))


@pytest.mark.slow
def test_k_quant_gguf_answers_alone_batched_chunked_and_cached_alike() -> None:
    """The real Q4_K_M 0.5B: Q5_0, Q8_0, Q4_K and Q6_K layers, each on its row kernels."""
    from lmkernel import load_model

    _all_same(invariance(load_model("qwen2.5-coder-0.5b-instruct"), MEASURED_PROMPTS[:3], 10, "128MiB", deterministic=True))


def test_seeded_sampling_is_batch_invariant_too(smollm) -> None:
    llm = LLM(smollm, kv_cache_memory="64MiB", verbose=False, deterministic=True, max_num_batched_tokens=24,
              max_num_seqs=8)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16, logprobs=0)
    prompt = smollm.tokenizer.encode("Once upon a time, in a small village by the sea,")
    alone = llm.generate([prompt], params)[0].outputs[0]
    others = [smollm.tokenizer.encode(f"Fact number {i}: the") for i in range(6)]
    batched = llm.generate([prompt, *others], [params] + [SamplingParams(temperature=1.0, max_tokens=20)] * 6)[0].outputs[0]
    assert batched.token_ids == alone.token_ids
    assert [p[t].logprob for t, p in zip(batched.token_ids, batched.logprobs)] == \
        [p[t].logprob for t, p in zip(alone.token_ids, alone.logprobs)]


def test_deterministic_mode_is_refused_where_it_cannot_hold(smollm, tmp_path) -> None:
    with pytest.raises(EngineConfigError, match="--deterministic needs the fused CPU decode step"):
        LLM(smollm, kv_cache_memory="16MiB", verbose=False, deterministic=True, decode_backend="torch")
    with pytest.raises(EngineConfigError, match="--deterministic"):
        LLM(smollm, kv_cache_memory="16MiB", verbose=False, deterministic=True, max_loras=1)
    with pytest.raises(EngineConfigError, match="--deterministic .* must be true or false"):
        LLM(smollm, kv_cache_memory="16MiB", verbose=False, deterministic="yes")


def test_deterministic_mode_reports_itself(smollm) -> None:
    llm = LLM(smollm, kv_cache_memory="16MiB", verbose=False, deterministic=True)
    assert llm.stats()["deterministic"] is True
