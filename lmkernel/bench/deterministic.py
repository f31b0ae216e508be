"""Batch-invariant mode (`EngineConfig.deterministic`): does a request get the same tokens and log-probs alone,
in a batch of 32, with its prompt chunked, and after its prefix was cached; and what does the mode cost per
prompt token and per decode step against the default, measured side by side in one process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmkernel.bench.speculative import CHAT_PROMPTS, EDIT_PROMPTS, chat_prompts
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loading import LoadedModel

# Prompts that share the batch with the measured ones (none of them is measured).
OTHER_PROMPTS = CHAT_PROMPTS + [
    "List four prime numbers greater than fifty.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "What does the `yield` keyword do in Python?",
    "Name three rivers in Africa and the countries they flow through.",
]
CONDITIONS = ("batch of 32", "chunked prompt", "prefix from cache")

Answer = tuple[list[int], list[float]]  # the tokens, and the log-prob of each


@dataclass
class Invariance:
    """How many of the measured prompts gave exactly their lone answer (tokens; tokens and log-probs) under each
    condition."""

    mode: str
    prompts: int
    same_tokens: dict[str, int]
    same_logprobs: dict[str, int]


def _answers(llm: LLM, prompts: Sequence[list[int]], params: SamplingParams) -> list[Answer]:
    outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [pos[t].logprob for t, pos in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


def invariance(loaded: LoadedModel, texts: Sequence[str], max_tokens: int, kv_cache_memory: str,
               deterministic: bool) -> Invariance:
    """Each prompt alone, then: inside one batch of 32 with other prompts, computed 16 prompt tokens a step,
    and again after the same prompt filled the prefix cache; greedy, with log-probs."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    common = dict(kv_cache_memory=kv_cache_memory, verbose=False, deterministic=deterministic)
    plain = LLM(loaded, enable_prefix_caching=False, **common)
    prompts = chat_prompts(plain, texts)
    others = chat_prompts(plain, OTHER_PROMPTS)
    alone = [_answers(plain, [p], params)[0] for p in prompts]
    batch = _answers(plain, prompts + others[: max(0, 32 - len(prompts))], params)[: len(prompts)]
    del plain
    chunked_llm = LLM(loaded, enable_prefix_caching=False, max_num_batched_tokens=16, max_num_seqs=16, **common)
    chunked = [_answers(chunked_llm, [p], params)[0] for p in prompts]
    del chunked_llm
    cached_llm = LLM(loaded, enable_prefix_caching=True, **common)
    cached = []
    for p in prompts:
        _answers(cached_llm, [p], params)  # fills the cache with the prompt's full blocks
        cached.append(_answers(cached_llm, [p], params)[0])
    got = dict(zip(CONDITIONS, (batch, chunked, cached)))
    return Invariance("deterministic" if deterministic else "default", len(prompts),
                      {c: sum(a[0] == b[0] for a, b in zip(alone, v)) for c, v in got.items()},
                      {c: sum(a == b for a, b in zip(alone, v)) for c, v in got.items()})


@dataclass
class Cost:
    """Seconds per prompt token (one long prompt) and per decode step at each batch size, by mode."""

    prompt_tokens: int
    prompt_seconds: dict[str, float]  # per prompt token
    step_seconds: dict[str, dict[int, float]]  # mode -> batch -> seconds a decode step


def _prompt_seconds(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return (time.perf_counter() - start) / len(prompt)


def _step_seconds(llm: LLM, prompts: Sequence[list[int]], steps: int) -> float:
    """Mean wall time of a decode step with len(prompts) sequences (the steps after every prompt is in)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"cost-{time.monotonic_ns()}-{i}", p, params)
    times: list[float] = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - start
        if all(o.outputs[0].token_ids for o in outs) and len(outs) == len(prompts):
            times.append(seconds)
    times = times[1:-1] or times  # the first and last steps carry the stragglers' prompt and the finish
    return sum(times) / len(times)


def cost(loaded: LoadedModel, prompt_text: str, batches: Sequence[int], steps: int, rounds: int,
         kv_cache_memory: str) -> Cost:
    """Both modes on engines over one loaded model, measured in turn `rounds` times (the best round kept)."""
    llms = {mode: LLM(loaded, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False, verbose=False,
                      deterministic=mode == "deterministic") for mode in ("default", "deterministic")}
    prompt = chat_prompts(llms["default"], [prompt_text])[0]
    short = chat_prompts(llms["default"], (EDIT_PROMPTS + OTHER_PROMPTS) * 4)
    prompt_s = {m: float("inf") for m in llms}
    step_s: dict[str, dict[int, float]] = {m: {b: float("inf") for b in batches} for m in llms}
    for _ in range(rounds):
        for mode, llm in llms.items():
            prompt_s[mode] = min(prompt_s[mode], _prompt_seconds(llm, prompt))
            for b in batches:
                step_s[mode][b] = min(step_s[mode][b], _step_seconds(llm, short[:b], steps))
    return Cost(len(prompt), prompt_s, step_s)

MEASURED_PROMPTS = EDIT_PROMPTS  # the 20 prompts whose answers are compared
# A long prompt for the cost of prompt processing (~500 tokens): the code-editing prompts' functions.
LONG_PROMPT = "Review these functions and list any bugs you find:\n\n" + "\n".join(EDIT_PROMPTS[:8])
