"""What a decode step costs as the batch grows: the weights are read once a step for every sequence in
it, so a step of 32 should cost about a step of 1 plus the arithmetic. Measured with the CPU kernels'
widest path and, where the process has AMX tiles, with them switched off, alternating in one run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from lmkernel.bench.structured import decode_step_ms
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.layers import cpu_kernels


@dataclass
class StepCost:
    batch: int
    ms: float  # median decode step, the process's path (AMX tiles where granted)
    vector_ms: float | None  # the same with the tiles off (None without tiles)


def step_costs(llm: LLM, prompts: list[list[int]], batches: list[int], new_tokens: int, rounds: int) -> list[StepCost]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    tiles = cpu_kernels.current_path() == "amx"
    results = []
    for batch in batches:
        group = prompts[:batch]
        decode_step_ms(llm, group, params)  # warm
        ours, vector = [], []
        for _ in range(rounds):
            ours.append(decode_step_ms(llm, group, params))
            if tiles:
                cpu_kernels.select("avx512-vnni")
                try:
                    vector.append(decode_step_ms(llm, group, params))
                finally:
                    cpu_kernels.select("auto")
        results.append(StepCost(batch, statistics.median(ours), statistics.median(vector) if vector else None))
    return results
