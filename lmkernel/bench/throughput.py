"""Offline throughput: lmkernel's continuous batching against Hugging Face `generate` with static
batches (left padding), on the same prompts and output lengths, in one process."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmkernel.bench.workload import Workload
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams


@dataclass
class ThroughputResult:
    name: str
    seconds: float
    output_tokens: int
    kv_utilisation: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def run_lmkernel(llm: LLM, work: Workload) -> ThroughputResult:
    """All requests submitted at once; greedy, each generating exactly its output length."""
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    for i, (prompt, p) in enumerate(zip(work.prompts, params)):
        engine.add_request(f"bench-{i}", prompt, p)
    stored = slots = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.stats()
        stored, slots = stored + s["kv_tokens_stored"], slots + s["kv_slots_allocated"]
    seconds = time.perf_counter() - start
    return ThroughputResult("lmkernel", seconds, work.output_tokens, stored / slots if slots else None)


def run_hf_generate(model: torch.nn.Module, pad_id: int, work: Workload, batch_size: int) -> ThroughputResult:
    """Static batches in submission order, left-padded; a batch runs until its longest output is done."""
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(work.prompts), batch_size):
            prompts = work.prompts[b : b + batch_size]
            new = max(work.output_lens[b : b + batch_size])
            width = max(map(len, prompts))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=pad_id,
            )
    return ThroughputResult(f"transformers generate (static batch {batch_size})", time.perf_counter() - start, work.output_tokens)
