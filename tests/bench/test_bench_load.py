"""lmkernel.bench.load (file to first token, in fresh processes): its measuring script, how results are parsed and
the best one kept."""

from __future__ import annotations

import json
import mmap

import psutil
import pytest
import torch
from tiny_gguf import write_llama_gguf

import lmkernel
from lmkernel.bench import load
from lmkernel.bench.load import LoadResult, best_of, lmkernel_loads, lmkernel_script, resident_bytes, run_script
from lmkernel.errors import LmkError
from lmkernel.layers import cpu_kernels


def test_resident_bytes_is_the_processes_rss_and_grows_with_touched_memory() -> None:
    before = resident_bytes()
    assert abs(before - psutil.Process().memory_info().rss) < 8 << 20
    with mmap.mmap(-1, 64 << 20) as block:  # fresh anonymous pages: an allocator could reuse resident ones
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        assert resident_bytes() - before >= 60 << 20


def test_a_script_result_is_its_last_line_of_output() -> None:
    script = "import json; print('loading...'); print(json.dumps({'seconds': 1.5, 'resident': 2048.0}))"
    assert run_script(script, "a load") == LoadResult(1.5, 2048)


def test_a_failing_script_names_what_was_measured_and_its_last_error_line() -> None:
    with pytest.raises(LmkError, match=r"^measuring llama.cpp's load failed: ValueError: no such model$"):
        run_script("raise ValueError('no such model')", "llama.cpp's load")
    with pytest.raises(LmkError, match=r"^measuring x failed: exit code 3, no output$"):
        run_script("import sys; sys.exit(3)", "x")
    with pytest.raises(LmkError, match=r"^measuring x failed: killed by SIGILL$"):  # a peer built for another CPU
        run_script("import os, signal; os.kill(os.getpid(), signal.SIGILL)", "x")


def test_best_of_is_the_fastest_load_with_its_own_memory(monkeypatch) -> None:
    results, calls = [LoadResult(3.0, 10), LoadResult(1.0, 30), LoadResult(2.0, 5)], []

    def fake_run(script: str, what: str) -> LoadResult:
        calls.append((script, what))
        return results[len(calls) - 1]

    monkeypatch.setattr(load, "run_script", fake_run)
    assert best_of("SCRIPT", "the load", 3) == LoadResult(1.0, 30)
    assert calls == [("SCRIPT", "the load")] * 3


def test_first_loads_each_get_an_empty_cache_and_later_loads_share_one(tmp_path, monkeypatch) -> None:
    """2 rounds: first loads into first-0 and first-1 (each removed after), one load to fill kept, then 2 timed
    loads from kept; every cache is made under $LMK_HOME and removed at the end."""
    monkeypatch.setenv("LMK_HOME", str(tmp_path / "home"))
    made, timings = [], iter([LoadResult(5.0, 1), LoadResult(4.0, 2), LoadResult(9.0, 3), LoadResult(2.0, 4), LoadResult(1.5, 5)])
    monkeypatch.setattr(load, "lmkernel_script", lambda model, threads, context, cpu_path, packed: json.dumps(
        [model, threads, context, cpu_path, packed]))

    def fake_run(script: str, what: str) -> LoadResult:
        model, threads, context, cpu_path, packed = json.loads(script)
        assert (model, threads, context, cpu_path) == ("m.gguf", 3, 512, "avx2")
        (tmp_path / "home").joinpath(packed).mkdir(parents=True, exist_ok=True)  # a load writes its packed cache
        made.append((packed.rsplit("/", 2)[-2:], what, sorted(p.name for p in (tmp_path / "home").glob("bench-packed-*/*"))))
        return next(timings)

    monkeypatch.setattr(load, "run_script", fake_run)
    first, later = lmkernel_loads("m.gguf", 3, 512, "avx2", 2)
    assert (first, later) == (LoadResult(4.0, 2), LoadResult(1.5, 5))
    root = made[0][0][0]
    assert root.startswith("bench-packed-")
    assert made == [([root, "first-0"], "lmkernel's first load", ["first-0"]),
                    ([root, "first-1"], "lmkernel's first load", ["first-1"]),
                    ([root, "kept"], "lmkernel's first load", ["kept"]),
                    ([root, "kept"], "lmkernel's load", ["kept"]),
                    ([root, "kept"], "lmkernel's load", ["kept"])]
    assert list((tmp_path / "home").iterdir()) == []


def test_the_lmkernel_script_loads_with_the_settings_given_and_prints_a_load_result(tiny_llama, tmp_path, monkeypatch,
                                                                                   capsys) -> None:
    """Run in this process (a fresh one would spend seconds importing): threads, CPU path, packed cache and a KV
    cache of 40 tokens, i.e. 3 blocks of 16 x 2 layers x 2 KV heads x 64 x K and V x 4 bytes."""
    model = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    seen: dict = {}
    real_load, real_llm = lmkernel.load_model, lmkernel.LLM

    def loading(name, **kwargs):
        seen["load"] = (name, kwargs)
        return real_load(name, **kwargs)

    def engine(loaded, **kwargs):
        seen["llm"] = kwargs
        return real_llm(loaded, **kwargs)

    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("threads", n))
    monkeypatch.setattr(cpu_kernels, "select", lambda path: seen.setdefault("cpu_path", path))
    monkeypatch.setattr(lmkernel, "load_model", loading)
    monkeypatch.setattr(lmkernel, "LLM", engine)
    script = lmkernel_script(str(model), 3, 40, "portable", str(tmp_path / "packed"))
    exec(compile(script, "<lmkernel_script>", "exec"), {})
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == {"threads": 3, "cpu_path": "portable", "load": (str(model), {"packed_cache": str(tmp_path / "packed")}),
                    "llm": {"kv_cache_memory": 98_304, "verbose": False}}
    assert set(printed) == {"seconds", "resident"} and 0 < printed["seconds"] < 60 and isinstance(printed["resident"], int)
