"""lmkernel.bench.decode_steps: median decode-step costs per batch size, with the AMX tiles and, alternating, without."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmkernel.bench import decode_steps
from lmkernel.bench.decode_steps import StepCost, step_costs

PROMPTS = [[1, 2], [3, 4, 5], [6], [7, 8], [9]]


class FakeKernels:
    """`cpu_kernels` as step_costs uses it: the path the process runs, switched by `select`."""

    def __init__(self, path: str) -> None:
        self.path, self.selected = path, []

    def current_path(self) -> str:
        return self.path

    def select(self, path: str) -> str:
        self.selected.append(path)
        self.path = "amx" if path == "auto" else path
        return self.path


def _patch(monkeypatch: pytest.MonkeyPatch, path: str, times: dict[str, list[float]]) -> tuple[FakeKernels, list]:
    """Each decode_step_ms call takes the next time for the path then in use; calls are recorded."""
    kernels, calls = FakeKernels(path), []

    def decode_step_ms(llm, group, params):
        calls.append((kernels.path, len(group), params))
        return times[kernels.path].pop(0)

    monkeypatch.setattr(decode_steps, "cpu_kernels", kernels)
    monkeypatch.setattr(decode_steps, "decode_step_ms", decode_step_ms)
    return kernels, calls


def test_with_tiles_each_round_alternates_the_tiles_and_the_vector_path(monkeypatch) -> None:
    # batch 1: warm 99, tiles 4, 2, 9 (median 4), vector 10, 30, 20 (median 20); batch 4: warm 99, tiles 5, 7, 6, vector 8, 8, 1
    kernels, calls = _patch(monkeypatch, "amx", {"amx": [99, 4, 2, 9, 99, 5, 7, 6], "avx512-vnni": [10, 30, 20, 8, 8, 1]})
    got = step_costs(SimpleNamespace(), PROMPTS, [1, 4], new_tokens=3, rounds=3)
    assert got == [StepCost(1, 4, 20), StepCost(4, 6, 8)]
    assert [(path, batch) for path, batch, _ in calls] == (
        [("amx", 1)] + [("amx", 1), ("avx512-vnni", 1)] * 3 + [("amx", 4)] + [("amx", 4), ("avx512-vnni", 4)] * 3)
    assert kernels.selected == ["avx512-vnni", "auto"] * 6 and kernels.path == "amx"
    params = {id(p) for _, _, p in calls}
    assert len(params) == 1  # one greedy setting for every measurement
    p = calls[0][2]
    assert (p.temperature, p.max_tokens, p.ignore_eos) == (0, 3, True)


def test_without_tiles_there_is_no_vector_figure_and_the_path_is_left_alone(monkeypatch) -> None:
    kernels, calls = _patch(monkeypatch, "avx512-vnni", {"avx512-vnni": [50, 3, 1, 50, 8, 6]})
    assert step_costs(SimpleNamespace(), PROMPTS, [2, 5], new_tokens=2, rounds=2) == [StepCost(2, 2.0, None), StepCost(5, 7.0, None)]
    assert kernels.selected == [] and [b for _, b, _ in calls] == [2, 2, 2, 5, 5, 5]


def test_the_tiles_come_back_when_the_vector_measurement_fails(monkeypatch) -> None:
    kernels, _ = _patch(monkeypatch, "amx", {"amx": [1, 1], "avx512-vnni": []})  # the vector call finds no time: IndexError
    with pytest.raises(IndexError):
        step_costs(SimpleNamespace(), PROMPTS, [1], new_tokens=2, rounds=1)
    assert kernels.selected == ["avx512-vnni", "auto"] and kernels.path == "amx"
