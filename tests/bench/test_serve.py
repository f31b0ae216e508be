"""`lmk bench serve`'s parts that need no server: how a run's wall time is split by the engine's counters."""

from __future__ import annotations

import pytest

from lmkernel.bench.serve import breakdown


def test_breakdown_splits_the_wall_time_between_engine_phases_and_the_rest() -> None:
    before = {"lmkernel_engine_step_seconds:forward_decode": 1.0, "lmkernel_engine_step_seconds:sampling": 0.5,
              "lmkernel_engine_steps:decode": 10, "lmkernel_engine_tokens:decode": 80}
    after = {"lmkernel_engine_step_seconds:forward_decode": 4.0, "lmkernel_engine_step_seconds:sampling": 0.75,
             "lmkernel_engine_steps:decode": 30, "lmkernel_engine_tokens:decode": 240}
    split = breakdown(before, after, wall=5.0)
    assert split["forward_decode"] == pytest.approx(3.0) and split["sampling"] == pytest.approx(0.25)
    assert split["HTTP and the rest"] == pytest.approx(1.75)
    assert split["lmkernel_engine_steps:decode"] == 20 and split["lmkernel_engine_tokens:decode"] == 160
