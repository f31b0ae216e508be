"""lmkernel.cli.bench_serve (`lmk bench serve`): workloads and settings handed on, throughput tables, HTTP overhead, time split, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_output import one_error_line, table_rows
from test_cli import invoke

import lmkernel.bench.workload
import lmkernel.loading
from lmkernel.bench import machine
from lmkernel.bench import serve as bench_serve
from lmkernel.bench.serve import Limits, LoadResult, PeerRun
from lmkernel.layers import cpu_kernels


@pytest.fixture
def calls(monkeypatch) -> dict:
    """A loader and a workload that record their arguments and load nothing."""
    seen: dict = {"workload": []}

    def load_model(model, device="auto"):
        seen["load"] = (model, device)
        return SimpleNamespace(tokenizer="TOK", source=SimpleNamespace(path=Path("/models/smol-q4.gguf")))

    def text_workload(tokenizer, n, prompt_span, output_span, seed=0):
        seen["workload"].append((n, prompt_span, output_span, seed))
        return SimpleNamespace(n=n, seed=seed)

    monkeypatch.setattr(lmkernel.loading, "load_model", load_model)
    monkeypatch.setattr(lmkernel.bench.workload, "text_workload", text_workload)
    monkeypatch.setattr(cpu_kernels, "current_path", lambda: "avx512-vnni")
    monkeypatch.setattr(machine, "cpu_name", lambda: "Test CPU")
    return seen


@pytest.mark.parametrize(("args", "parts"), [
    (["--peer", "vllm"], ["--peer vllm: the serving peer is llama-server"]),
    (["--peer", "llama-server", "--model", "all-minilm-l6-v2"],
     ["all-minilm-l6-v2: llama-server runs GGUF files; this is a hf_dir"]),
])
def test_a_wrong_peer_or_a_model_llama_server_cannot_run_is_one_line(monkeypatch, args, parts) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    one_error_line(invoke("bench", "serve", *args), *parts)


def test_each_level_runs_over_http_and_in_process_and_the_overhead_is_their_difference(monkeypatch, calls) -> None:
    seen = {}

    def start(args, log):
        seen["server"] = (args, log.name, log.parent.is_dir())
        return "SERVER"

    def both(server, loaded, model, kv_cache_memory, works, levels):
        seen["run"] = (server, model, kv_cache_memory, {c: (w.n, w.seed) for c, w in works.items()}, levels)
        http = {1: LoadResult(1, 2.0, 4, 256, [0.1, 0.3], [0.02, 0.04]),
                2: LoadResult(2, 4.0, 8, 640, [0.2, 0.2], [0.03, 0.03])}
        inproc = {1: LoadResult(1, 1.6, 4, 256, [], []), 2: LoadResult(2, 4.0, 8, 640, [], [])}
        return http, inproc

    monkeypatch.setattr(bench_serve, "start_server_process", start)
    monkeypatch.setattr(bench_serve, "http_and_in_process", both)
    out = invoke("bench", "serve", "--model", "m", "--concurrency", "1", "--concurrency", "2", "--requests-per-client", "4",
                 "--min-prompt", "8", "--max-prompt", "16", "--output-tokens", "64", "--seed", "5",
                 "--kv-cache-memory", "64MiB", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert calls["load"] == ("m", "cpu")
    assert calls["workload"] == [(4, (8, 16), (64, 64), 6), (8, (8, 16), (64, 64), 7)]  # a seed per level
    assert seen["server"] == (["m", "--kv-cache-memory", "64MiB", "--device", "cpu"], "serve.log", True)
    assert seen["run"] == ("SERVER", "m", "64MiB", {1: (4, 6), 2: (8, 7)}, [1, 2])
    # p99 of two values a and b is a + 0.99 (b - a): 0.298 s and 39.8 ms
    assert table_rows(out.stdout) == [["1", "4", "2.00", "128.0", "200", "298", "30", "40"],
                                      ["2", "8", "2.00", "160.0", "200", "200", "30", "30"]]
    assert out.stdout.splitlines()[-2:] == [
        "1 clients: HTTP 128.0 tok/s, in-process LLM.generate 160.0 tok/s; HTTP overhead 20.0%",
        "2 clients: HTTP 160.0 tok/s, in-process LLM.generate 160.0 tok/s; HTTP overhead 0.0%",
    ]


def _peer_run() -> PeerRun:
    ours = {1: LoadResult(1, 5.0, 4, 500, [0.2, 0.4], [0.02, 0.02]), 8: LoadResult(8, 10.0, 32, 2000, [0.5, 1.5], [0.05, 0.07])}
    theirs = {1: LoadResult(1, 5.0, 4, 400, [0.3, 0.3], [0.03, 0.03]), 8: LoadResult(8, 10.0, 32, 1600, [1.0, 2.0], [0.06, 0.08])}
    phases = {"forward_prefill": 2.0, "forward_decode": 5.0, "logits": 0.5, "sampling": 0.3, "schedule": 0.4, "process": 0.2,
              "HTTP and the rest": 1.6, "lmkernel_engine_steps:decode": 250, "lmkernel_engine_tokens:decode": 1000,
              "lmkernel_engine_steps:prefill": 10, "lmkernel_engine_tokens:prompt": 4000}
    limits = Limits(batch=4, attention_ms=2.0, floor_ms=5.0, compute_ms=1.0, prefill_limit_tps=3000.0, bandwidth_gbs=20.0,
                    peak_tmacs=1.5, units="AVX-512 VNNI")
    return PeerRun(Path("/peers/llama-server"), "built with -DGGML_NATIVE=ON", 2, [1, 8], ours, theirs, 8, phases, 100, limits)


def test_against_llama_server_prints_both_servers_and_where_lmk_serves_time_went(monkeypatch, calls, tmp_path: Path) -> None:
    seen = {}
    binary = tmp_path / "llama-server"

    def against(model, loaded, works, kv_cache_memory, device, peer_binary, cmake_args, output_tokens, log):
        seen.update(model=model, works={c: (w.n, w.seed) for c, w in works.items()}, kv=kv_cache_memory, device=device,
                    binary=peer_binary, cmake=cmake_args, output=output_tokens)
        return _peer_run()

    monkeypatch.setattr(bench_serve, "against_llama_server", against)
    monkeypatch.setattr(bench_serve, "start_server_process", lambda *a: pytest.fail("started lmk serve outside the run"))
    out = invoke("bench", "serve", "--model", "smollm2-135m-instruct", "--peer", "llama-server", "--peer-binary", str(binary),
                 "--peer-cmake-args", "-DGGML_NATIVE=ON", "--concurrency", "1", "--concurrency", "8",
                 "--requests-per-client", "2", "--min-prompt", "16", "--max-prompt", "32", "--output-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert seen == {"model": "smollm2-135m-instruct", "works": {1: (2, 1), 8: (16, 8), 0: (4, 10_000)}, "kv": "1GiB",
                    "device": "auto", "binary": binary, "cmake": "-DGGML_NATIVE=ON", "output": 8}
    assert calls["workload"][-1] == (4, (16, 32), (8, 8), 10_000)  # the warm-up prompts: 8 tokens each
    text = " ".join(out.stdout.split())
    assert "smollm2-135m-instruct (smol-q4.gguf) on Test CPU, 2 threads; prompts 16-32 tokens (distinct), 8 tokens each" in text
    assert ("lmkernel kernels: avx512-vnni; llama-server /peers/llama-server, built with -DGGML_NATIVE=ON; -t 2 -tb 2 "
            "-np STREAMS -c 1024*STREAMS -cb") in text
    assert text.endswith("limits measured in this run: read bandwidth 20.0 GB/s, int8 peak 1.50 T multiply-adds/s on "
                         "AVX-512 VNNI")
    rows = table_rows(out.stdout)
    assert rows[:2] == [
        ["1", "4", "100.0", "80.0", "1.25x", "0.30 / 0.30", "0.40 / 0.30", "20 / 30", "20 / 30"],
        ["8", "32", "200.0", "160.0", "1.25x", "1.00 / 1.50", "1.49 / 1.99", "60 / 70", "70 / 80"],
    ]
    # wall 10 s at 8 streams; 250 decode steps of 4 sequences: 20 ms each, 2 of them attention
    assert rows[2:] == [
        ["prefill (forward of steps with prompt tokens)", "2.0", "20%", "10 of them",
         "2000 prompt tok/s; projections at the int8 peak: 3000"],
        ["decode forward (4.0 sequences a step)", "5.0", "50%", "20.0 ms", "bandwidth floor 5.0 ms, compute 1.0 ms"],
        ["of which attention (100-token contexts, measured alone)", "0.5", "5%", "2.0 ms", ""],
        ["of which projections, norms, rotary (the rest)", "4.5", "45%", "18.0 ms", "28% of the bandwidth"],
        ["output layer (logits)", "0.5", "5%", "", ""],
        ["sampling", "0.3", "3%", "", ""],
        ["scheduling, detokenizing, stop checks", "0.6", "6%", "", ""],
        ["HTTP, streaming, the event loop, idle", "1.6", "16%", "", ""],
    ]
