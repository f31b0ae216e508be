"""What enforcing a grammar costs a decode step: the same requests decoded with and without a JSON-schema
constraint, alternating in one run, at batch sizes 1 and 8."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.structured import StructuredOutputs

# An array that cannot be complete within the measured steps, so every constrained step is masked and no
# request ends early: the two sides decode the same number of steps.
OPEN_ENDED = {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                                          "score": {"type": "number"}},
                                         "required": ["name", "score"]}, "minItems": 1000}


@dataclass
class MaskCost:
    batch: int
    free_ms: float  # median decode step, unconstrained
    masked_ms: float  # median decode step, every request constrained
    overhead: float  # median over rounds of masked / free - 1


def decode_step_ms(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Median milliseconds of the decode steps of `prompts` run together (prefill steps excluded)."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"step-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting
        start = time.perf_counter()
        engine.step()
        if not prefill:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def mask_cost(llm: LLM, prompts: list[list[int]], batch: int, new_tokens: int, rounds: int) -> MaskCost:
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, ignore_eos=True)
    masked = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens,
                            structured_outputs=StructuredOutputs(json=OPEN_ENDED))
    group = prompts[:batch]
    decode_step_ms(llm, group, masked)  # warm: the grammar compiler reads the vocabulary once
    free_ms, masked_ms = [], []
    for _ in range(rounds):
        free_ms.append(decode_step_ms(llm, group, free))
        masked_ms.append(decode_step_ms(llm, group, masked))
    return MaskCost(batch, statistics.median(free_ms), statistics.median(masked_ms),
                    statistics.median(m / f - 1 for m, f in zip(masked_ms, free_ms)))
