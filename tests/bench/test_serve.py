"""`lmk bench serve`'s parts that need no server: how a run's wall time is split by the engine's counters,
and which llama-server build is the peer's best on this CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.bench import llama_server_peer
from lmkernel.bench.serve import breakdown
from lmkernel.errors import LmkError


def test_breakdown_splits_the_wall_time_between_engine_phases_and_the_rest() -> None:
    before = {"lmkernel_engine_step_seconds:forward_decode": 1.0, "lmkernel_engine_step_seconds:sampling": 0.5,
              "lmkernel_engine_steps:decode": 10, "lmkernel_engine_tokens:decode": 80}
    after = {"lmkernel_engine_step_seconds:forward_decode": 4.0, "lmkernel_engine_step_seconds:sampling": 0.75,
             "lmkernel_engine_steps:decode": 30, "lmkernel_engine_tokens:decode": 240}
    split = breakdown(before, after, wall=5.0)
    assert split["forward_decode"] == pytest.approx(3.0) and split["sampling"] == pytest.approx(0.25)
    assert split["HTTP and the rest"] == pytest.approx(1.75)
    assert split["lmkernel_engine_steps:decode"] == 20 and split["lmkernel_engine_tokens:decode"] == 160


def test_peer_build_leaves_out_amx_where_the_cpu_reports_it() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    chosen = llama_server_peer.default_cmake_flags()
    if "amx_int8" in flags:  # llama.cpp's AMX path faults at ldtilecfg on some virtual machines
        assert chosen == llama_server_peer.NO_AMX_FLAGS and "GGML_NATIVE=OFF" in chosen
    else:
        assert chosen == llama_server_peer.NATIVE_FLAGS


def test_a_peer_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(LmkError, match="exited with"):
        llama_server_peer.start_llama_server(Path("/bin/false"), tmp_path / "m.gguf", 2, 1, 1, tmp_path / "log")

