"""KV-cache memory one long sequence holds, with the hybrid cache (sliding-window layers give back the blocks
that left their window) against every layer keeping every block, on the same model in one run.

Each context runs in both engines: its peak KV bytes (blocks held across the groups, times a block's
bytes), its greedy continuation (the two must agree) and its time. The full-attention figure is also
computed from the model's shape, so the measured one can be checked against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loading import LoadedModel


@dataclass(frozen=True)
class KVMemoryRun:
    """One context through one engine: its KV bytes at the peak (within a prompt step, before the blocks that left
    the window go back) and while decoding, its continuation and its seconds."""

    peak_bytes: int
    decode_bytes: int
    token_ids: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class KVMemoryRow:
    context: int
    hybrid: KVMemoryRun
    full: KVMemoryRun
    full_from_shape: int  # K and V of every layer for every token of the decoding snapshot, from the model's shape

    @property
    def ratio(self) -> float:
        """How many times less memory the hybrid cache holds while the sequence decodes."""
        return self.full.decode_bytes / self.hybrid.decode_bytes


def full_attention_bytes(loaded: LoadedModel, num_tokens: int, block_size: int) -> int:
    """K and V of every layer for `num_tokens` tokens, rounded up to whole blocks."""
    c = loaded.config
    element = loaded.dtype.itemsize  # the cache keeps the model's dtype
    blocks = -(-num_tokens // block_size)
    return 2 * c.num_layers * blocks * block_size * c.num_kv_heads * c.head_dim * element


def run_once(llm: LLM, prompt: list[int], new_tokens: int) -> KVMemoryRun:
    """Prefill `prompt` and decode `new_tokens` greedily, step by step, alone in the engine: the pool's high-water
    mark is the sequence's peak, and what it holds after the last decode step but one is its decoding share."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    block_bytes = int(engine.stats()["kv_block_bytes"])
    engine.reset_kv_peak()
    start = time.perf_counter()
    engine.add_request("kv", prompt, params)
    held, tokens = 0, ()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = tuple(out.outputs[0].token_ids)
        if engine.has_unfinished_requests():
            held = engine.kv_blocks_held("kv") * block_bytes
    return KVMemoryRun(int(engine.stats()["kv_blocks_peak"]) * block_bytes, held, tokens, time.perf_counter() - start)


def measure(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, kv_cache_memory: str,
            max_num_batched_tokens: int) -> list[KVMemoryRow]:
    """Each prompt through a hybrid engine and a full-attention one on the same loaded model."""
    engines = {hybrid: LLM(loaded, kv_cache_memory=kv_cache_memory, verbose=False, enable_prefix_caching=False,
                           max_num_batched_tokens=max_num_batched_tokens, hybrid_kv_cache=hybrid)
               for hybrid in (True, False)}
    rows = []
    for prompt in prompts:
        hybrid, full = (run_once(engines[h], prompt, new_tokens) for h in (True, False))
        total = len(prompt) + new_tokens - 2  # computed when the last decode step starts (its input is the one before)
        rows.append(KVMemoryRow(len(prompt), hybrid, full, full_attention_bytes(loaded, total, engines[True].config.block_size)))
    return rows
