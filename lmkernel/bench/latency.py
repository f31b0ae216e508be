"""Batch-1 decode latency against the memory-bandwidth floor measured in the same process.

Each decode step must read every weight once, so weight bytes / read bandwidth is the fastest a
step can be on this machine; the ratio floor / measured says how close the engine gets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkernel.bench.llama_cpp_peer import CONTEXT, LlamaCppPeer, load_script
from lmkernel.bench.load import LoadResult, best_of, lmkernel_loads
from lmkernel.bench.workload import text_workload
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError
from lmkernel.layers.linear import GGUFEmbedding
from lmkernel.registry import resolve


def read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best observed bytes/second for reading a buffer larger than the caches (a float32 sum)."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all but the embedding tables (a row each); a tied head once."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, GGUFEmbedding)):
            continue
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct weights, parameters and (quantized layers') buffers; a tied head counts once."""
    unique = {p.data_ptr(): p for p in (*model.parameters(), *model.buffers())}
    return sum(p.numel() * p.element_size() for p in unique.values())


@dataclass
class LatencyResult:
    ms_per_token: float
    floor_ms: float
    bandwidth_gbs: float
    peer_ms_per_token: float | None = None
    kv_utilisation: float | None = None
    fraction_of_floor: float = 0.0  # median of paired rounds (see `measure`)


def decode_latency(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, float | None]:
    """Milliseconds per decoded token for one request, prefill excluded, and the KV-cache utilisation
    over those steps (tokens stored / token slots allocated, read between steps, outside the timing)."""
    engine = llm.engine
    engine.add_request("latency", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    engine.step()  # prefill and first token
    seconds, steps, stored, slots = 0.0, 0, 0, 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        seconds += time.perf_counter() - start
        steps += 1
        s = engine.stats()
        stored, slots = stored + s["kv_tokens_stored"], slots + s["kv_slots_allocated"]
    return seconds * 1000 / max(steps, 1), (stored / slots if slots else None)


def hf_decode_latency(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    """Milliseconds per decoded token of transformers `generate` at batch 1: the time of a run of
    1 + new_tokens tokens less that of a run of one (the prefill)."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    with torch.inference_mode():
        return (timed(1 + new_tokens) - timed(1)) * 1000 / new_tokens


def measure(
    llm: LLM, prompt: list[int], new_tokens: int, rounds: int = 5, peer: torch.nn.Module | None = None
) -> LatencyResult:
    """Alternate bandwidth, lmkernel and (optionally) transformers measurements (the machine is shared
    and noisy). Speeds and bandwidth are the best of the rounds; the fraction of the floor is the median
    over rounds of each decode against the better of the bandwidths read just before and just after it,
    so that both sides of the ratio come from the same minute."""
    weights = weight_bytes(llm.loaded.model)
    bandwidth, ms, peer_ms, utilisation, fractions = read_bandwidth(), float("inf"), float("inf"), None, []
    before = bandwidth
    for _ in range(rounds):
        round_ms, utilisation = decode_latency(llm, prompt, new_tokens)
        after = read_bandwidth()
        fractions.append(weights / max(before, after) * 1000 / round_ms)
        bandwidth, ms, before = max(bandwidth, after), min(ms, round_ms), after
        if peer is not None:
            peer_ms = min(peer_ms, hf_decode_latency(peer, prompt, new_tokens))
            before = read_bandwidth()
            bandwidth = max(bandwidth, before)
    floor = weights / bandwidth * 1000
    return LatencyResult(ms, floor, bandwidth / 1e9, peer_ms if peer is not None else None, utilisation,
                         statistics.median(fractions))


PAUSE = 1.0  # seconds between one side's measurement and the other's


@dataclass
class PeerComparison:
    """lmkernel against llama.cpp on one GGUF file: medians over alternating rounds, and the median of
    each round's ratio (a noisy minute slows both sides of a ratio alike)."""

    decode_ms: tuple[float, float]  # lmkernel, llama.cpp: ms per greedy token at batch 1
    prefill_tps: tuple[float, float]  # prompt tokens per second, one prompt from an empty cache
    decode_ratio: float  # llama.cpp ms / lmkernel ms (> 1: lmkernel faster)
    prefill_ratio: float  # lmkernel tok/s / llama.cpp tok/s
    floor_ms: float  # decode's floor: the weights a step reads / the read bandwidth measured each round
    floor_fractions: tuple[float, float]  # lmkernel, llama.cpp: median over rounds of floor / decode time


def prefill_tokens_per_second(llm: LLM, prompt: list[int]) -> float:
    """One prompt through the engine from an empty cache (no prefix reuse), to its first token."""
    engine = llm.engine
    start = time.perf_counter()
    engine.add_request("prefill", prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompt) / (time.perf_counter() - start)


def compare_llama_cpp(llm: LLM, peer: object, prompt: list[int], long_prompt: list[int], new_tokens: int,
                      rounds: int) -> PeerComparison:
    """Alternate lmkernel and llama.cpp (`bench.llama_cpp_peer.LlamaCppPeer`): batch-1 greedy decode
    after `prompt`, and the prefill of `long_prompt`. `llm` must not reuse cached prefixes."""
    ours_ms, peer_ms, ours_tps, peer_tps, floors = [], [], [], [], []
    step_bytes = decode_bytes(llm.engine.loaded.model)

    def settled(measure: Callable[[], float]) -> float:
        time.sleep(PAUSE)  # each side's worker threads spin a while after their work; let them go idle
        return measure()

    settled(lambda: decode_latency(llm, prompt, 8)[0])  # warm both: first calls fault the mapped weights in
    settled(lambda: peer.decode_ms(prompt, 8))
    for _ in range(rounds):
        ours_ms.append(settled(lambda: decode_latency(llm, prompt, new_tokens)[0]))
        peer_ms.append(settled(lambda: peer.decode_ms(prompt, new_tokens)))
        floors.append(step_bytes / settled(lambda: read_bandwidth(repeats=3)) * 1000)
        ours_tps.append(settled(lambda: prefill_tokens_per_second(llm, long_prompt)))
        peer_tps.append(settled(lambda: peer.prefill_tokens_per_second(long_prompt)))
    median = statistics.median
    return PeerComparison(
        (median(ours_ms), median(peer_ms)), (median(ours_tps), median(peer_tps)),
        median(p / o for o, p in zip(ours_ms, peer_ms)), median(o / p for o, p in zip(ours_tps, peer_tps)),
        median(floors), (median(f / o for f, o in zip(floors, ours_ms)), median(f / p for f, p in zip(floors, peer_ms))),
    )


@dataclass
class LlamaCppRun:
    """`lmk bench latency --peer llama.cpp` measured: the file, the threads both sides had, their loads and the
    alternating decode and prompt rounds."""

    path: Path
    file_size: int
    threads: int
    first_load: LoadResult  # lmkernel's first load: packing, and writing the packed cache
    loads: tuple[LoadResult, LoadResult]  # lmkernel's later load (from the packed cache), llama.cpp's
    peer: LlamaCppPeer
    comparison: PeerComparison


def against_llama_cpp(model: str, prompt_tokens: int, new_tokens: int, prefill_tokens: int, rounds: int,
                      quantization: str | None, cpu_path: str = "auto") -> LlamaCppRun:
    """The same GGUF file in lmkernel and in llama.cpp with the same threads: loads (best of 3, each in a fresh
    process), then batch-1 decode after `prompt_tokens` and the prompt processing of `prefill_tokens`."""
    threads = torch.get_num_threads()
    source = resolve(model)
    if source.kind != "gguf":
        raise LmkError(f"{model}: llama.cpp runs GGUF files; this is a {source.kind}")
    file_size = source.path.stat().st_size
    first_load, later_load = lmkernel_loads(model, threads, CONTEXT, cpu_path, 3)
    loads = (later_load, best_of(load_script(source.path, threads), "llama.cpp's load", 3))
    llm = LLM(model, kv_cache_memory="256MiB", verbose=False, enable_prefix_caching=False, quantization=quantization,
              cpu_path=cpu_path)
    texts = text_workload(llm.tokenizer, 2, (max(prompt_tokens, prefill_tokens),) * 2, (1, 1)).prompts
    peer = LlamaCppPeer(source.path, threads)
    comparison = compare_llama_cpp(llm, peer, texts[0][:prompt_tokens], texts[1][:prefill_tokens], new_tokens, rounds)
    return LlamaCppRun(source.path, file_size, threads, first_load, loads, peer, comparison)
