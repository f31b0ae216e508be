"""lmkernel.cli.bench_speed (`lmk bench throughput, latency, embed, speculative, deterministic`): arguments handed on, tables and ratios, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_output import one_error_line, table_rows
from test_cli import invoke

import lmkernel.bench.workload
import lmkernel.engine.llm
import lmkernel.loading
from lmkernel.bench import deterministic, embed, latency, machine, peers, speculative, throughput
from lmkernel.bench.deterministic import Cost, Invariance
from lmkernel.bench.embed import EmbedSpeed
from lmkernel.bench.latency import LatencyResult, LlamaCppRun, PeerComparison
from lmkernel.bench.load import LoadResult
from lmkernel.bench.speculative import Run
from lmkernel.bench.throughput import ThroughputResult
from lmkernel.errors import LmkError
from lmkernel.layers import cpu_kernels


@pytest.fixture
def calls(monkeypatch) -> dict:
    """An LLM and a workload that record their arguments and load nothing; the kernels' names fixed."""
    seen: dict = {}

    class FakeLLM:
        def __init__(self, model, **kwargs) -> None:
            seen["LLM"] = (model, kwargs)
            self.tokenizer = SimpleNamespace(pad_token_id=None)
            self.loaded = SimpleNamespace(dtype=torch.float32, source="SOURCE", device="DEVICE")

    def text_workload(tokenizer, n, prompt_span, output_span, seed=0, **kwargs):
        seen.setdefault("workload", []).append((n, prompt_span, output_span, seed))
        return SimpleNamespace(prompt_tokens=100, output_tokens=200, prompts=[list(range(prompt_span[0]))] * n)

    monkeypatch.setattr(lmkernel.engine.llm, "LLM", FakeLLM)
    monkeypatch.setattr(lmkernel.bench.workload, "text_workload", text_workload)
    monkeypatch.setattr(cpu_kernels, "current_path", lambda: "avx2")
    monkeypatch.setattr(cpu_kernels, "amx_status", lambda: "not on this CPU")
    monkeypatch.setattr(machine, "cpu_name", lambda: "Test CPU")
    monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX2")
    return seen


def test_throughput_passes_the_engine_settings_and_prints_the_ratio_to_transformers(monkeypatch, calls) -> None:
    monkeypatch.setattr(throughput, "run_lmkernel", lambda llm, work: ThroughputResult("lmkernel", 2.0, 600, 0.5))

    def run_hf(model, pad_id, work, batch_size):
        calls["hf"] = (model, pad_id, work.output_tokens, batch_size)
        return ThroughputResult("transformers", 4.0, 480)

    monkeypatch.setattr(throughput, "run_hf_generate", run_hf)
    monkeypatch.setattr(peers, "load_hf_causal_lm", lambda source, dtype: ("HF", source, dtype))
    out = invoke("bench", "throughput", "--model", "m", "--num-requests", "4", "--min-prompt", "8", "--max-prompt", "16",
                 "--min-output", "2", "--max-output", "3", "--hf-batch-size", "2", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "64", "--seed", "7", "--dtype", "float32", "--device", "cpu",
                 "--kv-cache-memory", "64MiB")
    assert out.returncode == 0, out.stderr
    assert calls["LLM"] == ("m", {"dtype": "float32", "device": "cpu", "kv_cache_memory": "64MiB", "max_num_seqs": 4,
                                  "max_num_batched_tokens": 64, "verbose": False})
    assert calls["workload"] == [(4, (8, 16), (2, 3), 7)]
    assert calls["hf"] == (("HF", "SOURCE", torch.float32), 0, 200, 2)  # no pad token: 0
    assert out.stdout.splitlines() == [
        "4 requests, 100 prompt tokens, 200 output tokens, torch.float32",
        "lmkernel: 300.0 tok/s (2.0 s), KV-cache utilisation 50.0%",
        "transformers: 120.0 tok/s (4.0 s)",
        "ratio lmkernel / transformers: 2.50x",
    ]


def test_throughput_without_the_peer_loads_no_transformers_model(monkeypatch, calls) -> None:
    monkeypatch.setattr(throughput, "run_lmkernel", lambda llm, work: ThroughputResult("lmkernel", 2.0, 600, 0.5))
    monkeypatch.setattr(peers, "load_hf_causal_lm", lambda *a: pytest.fail("loaded the peer"))
    out = invoke("bench", "throughput", "--hf-batch-size", "0")
    assert out.returncode == 0, out.stderr
    assert calls["LLM"][0] == "smollm2-135m-instruct" and calls["workload"] == [(64, (16, 512), (32, 256), 0)]
    assert "ratio" not in out.stdout and len(out.stdout.splitlines()) == 2


@pytest.mark.parametrize(("args", "parts"), [
    (["--kv-cache-memory", "lots"], ["--kv-cache-memory", "'2GiB'", "got 'lots'"]),
    (["--max-num-seqs", "0"], ["--max-num-seqs", ">= 1; got 0"]),
    (["--dtype", "float8"], ["--dtype", "auto, float32, bfloat16, float16; got 'float8'"]),
])
def test_throughput_bad_engine_settings_are_one_line_naming_the_option(args, parts) -> None:
    one_error_line(invoke("bench", "throughput", *args), *parts)


def test_latency_hands_measure_the_prompt_and_the_peer_and_prints_the_floor_fractions(monkeypatch, calls) -> None:
    def measure(llm, prompt, new_tokens, rounds, hf):
        calls["measure"] = (len(prompt), new_tokens, rounds, hf)
        return LatencyResult(ms_per_token=4.0, floor_ms=2.0, bandwidth_gbs=12.5, peer_ms_per_token=10.0,
                             kv_utilisation=0.75, fraction_of_floor=0.45)

    class HF:
        def to(self, device):
            return ("HF on", device)

    monkeypatch.setattr(latency, "measure", measure)
    monkeypatch.setattr(peers, "load_hf_causal_lm", lambda source, dtype: HF())
    out = invoke("bench", "latency", "--model", "m", "--prompt-tokens", "12", "--new-tokens", "3", "--rounds", "2",
                 "--quantization", "dequantize", "--cpu-path", "avx2", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert calls["LLM"] == ("m", {"dtype": "auto", "device": "cpu", "kv_cache_memory": "256MiB", "verbose": False,
                                  "quantization": None, "cpu_path": "avx2"})
    assert calls["workload"] == [(1, (12, 12), (1, 1), 0)]
    assert calls["measure"] == (12, 3, 2, ("HF on", "DEVICE"))
    lines = out.stdout.splitlines()
    assert lines[0] == "read bandwidth 12.5 GB/s; floor 2.00 ms/token (torch.float32)"
    assert lines[1] == "lmkernel batch-1 decode: 4.00 ms/token = 250.0 tok/s"
    assert lines[2].startswith("fraction of the floor: 45% (") and lines[2].endswith("best against best: 50%)")
    assert lines[3].endswith(": 75.0%")
    assert lines[4] == ("transformers generate batch-1 decode: 10.00 ms/token = 100.0 tok/s, 20% of the floor; "
                        "lmkernel is 2.50x as fast")


def test_latency_without_a_peer_measures_lmkernel_alone(monkeypatch, calls) -> None:
    def measure(llm, prompt, new_tokens, rounds, hf):
        calls["peer"] = hf
        return LatencyResult(5.0, 2.5, 10.0, None, None, 0.5)

    monkeypatch.setattr(latency, "measure", measure)
    monkeypatch.setattr(peers, "load_hf_causal_lm", lambda *a: pytest.fail("loaded the peer"))
    out = invoke("bench", "latency", "--peer", "none", "--quantization", "keep")
    assert out.returncode == 0, out.stderr
    assert calls["peer"] is None and calls["LLM"][1]["quantization"] == "keep"
    assert len(out.stdout.splitlines()) == 3 and "lmkernel batch-1 decode: 5.00 ms/token = 200.0 tok/s" in out.stdout


@pytest.mark.parametrize(("args", "parts"), [
    (["--peer", "vllm"], ["--peer must be transformers, llama.cpp or none; got 'vllm'"]),
    (["--quantization", "bogus"], ["--quantization must be auto, keep or dequantize; got 'bogus'"]),
    (["--peer", "llama.cpp", "--quantization", "bogus"], ["--quantization must be auto, keep or dequantize; got 'bogus'"]),
    (["--cpu-path", "bogus"], ["--cpu-path", "auto, amx, avx512-vnni, avx512, avx2; got 'bogus'"]),
])
def test_latency_bad_options_are_one_line_naming_the_option(monkeypatch, args, parts) -> None:
    monkeypatch.setattr(latency, "against_llama_cpp", lambda *a: pytest.fail("measured"))
    one_error_line(invoke("bench", "latency", *args), *parts)


def test_latency_against_llama_cpp_prints_each_side_and_their_ratios(monkeypatch, calls) -> None:
    run = LlamaCppRun(
        path=Path("/models/smol-q4.gguf"), file_size=100_000_000, threads=2,
        first_load=LoadResult(3.0, 0), loads=(LoadResult(0.5, 150_000_000), LoadResult(0.25, 120_000_000)),
        peer=SimpleNamespace(build=lambda: "AVX = 1 | AMX_INT8 = 0"),
        comparison=PeerComparison(decode_ms=(4.0, 5.0), prefill_tps=(800.0, 400.0), decode_ratio=1.25, prefill_ratio=2.0,
                                  floor_ms=2.0, floor_fractions=(0.5, 0.4)))

    def against(*args):
        calls["against"] = args
        return run

    monkeypatch.setattr(latency, "against_llama_cpp", against)
    out = invoke("bench", "latency", "--peer", "llama.cpp", "--model", "m", "--prompt-tokens", "16", "--new-tokens", "4",
                 "--prefill-tokens", "32", "--rounds", "3", "--quantization", "dequantize", "--cpu-path", "avx2")
    assert out.returncode == 0, out.stderr
    assert calls["against"] == ("m", 16, 4, 32, 3, None, "avx2") and "LLM" not in calls
    lines = out.stdout.splitlines()
    assert lines[0] == "m (smol-q4.gguf, 100 MB) on Test CPU (AVX2), 2 threads; medians of 3 alternating rounds"
    assert lines[1] == "lmkernel kernels: avx2 (AMX: not on this CPU); llama.cpp build: AVX = 1 | AMX_INT8 = 0"
    rows = table_rows(out.stdout)
    assert rows[0] == ["batch-1 decode after 16 tokens", "250.0 tok/s (4.00 ms)", "200.0 tok/s (5.00 ms)", "1.25x"]
    assert rows[1][1:] == ["50%", "40%", ""] and "(2.00 ms:" in rows[1][0]
    assert rows[2] == ["prompt processing, 32 tokens", "800.0 tok/s", "400.0 tok/s", "2.00x"]
    assert rows[3][1:] == ["0.50 s", "0.25 s", "2.00x the time"]
    assert rows[4][1:] == ["3.00 s", "0.25 s", "12.00x the time"]
    assert rows[5] == ["resident memory the load adds (1024-token KV cache)", "150 MB (1.50x file)", "120 MB (1.20x file)", ""]


def test_latency_against_llama_cpp_reports_its_error_as_one_line(monkeypatch) -> None:
    def against(*args):
        raise LmkError("m: llama.cpp runs GGUF files; this is a hf_dir")

    monkeypatch.setattr(latency, "against_llama_cpp", against)
    one_error_line(invoke("bench", "latency", "--peer", "llama.cpp", "--model", "m"), "llama.cpp runs GGUF files")


@pytest.fixture
def phrasebank(tmp_path: Path) -> Path:
    path = tmp_path / "valid.jsonl"
    path.write_text('{"text": "Profit rose.", "label": "positive"}\n\n{"text": "Sales fell.", "label": "negative"}\n'
                    '{"text": "Nothing changed.", "label": "neutral"}\n')
    return path


def test_embed_hands_the_first_sentences_and_threads_and_prints_the_speed_ratio(monkeypatch, phrasebank) -> None:
    seen = {}
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(name=model, config=SimpleNamespace(is_encoder=True)))

    def embed_speed(loaded, texts, rounds, threads):
        seen.update(model=loaded.name, texts=texts, rounds=rounds, threads=threads)
        return EmbedSpeed("sentence-transformers", 2, 30, 160.0, 100.0, 0.999998)

    monkeypatch.setattr(embed, "embed_speed", embed_speed)
    out = invoke("bench", "embed", "--model", "enc", "--sentences", "2", "--rounds", "4", "--threads", "3",
                 "--phrasebank", str(phrasebank))
    assert out.returncode == 0, out.stderr
    assert seen == {"model": "enc", "texts": ["Profit rose.", "Sales fell."], "rounds": 4, "threads": 3}
    assert out.stdout.splitlines() == [
        "enc: 2 sentences (30 tokens), 3 threads, median of 4 rounds",
        "lmkernel 160.0 sentences/s; sentence-transformers 100.0 sentences/s; lmkernel is 1.60x as fast; lowest cosine "
        "between the two sides' embeddings 0.999998",
    ]


def test_embed_refuses_a_decoder_and_a_missing_file(monkeypatch, phrasebank, tmp_path: Path) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(config=SimpleNamespace(is_encoder=False)))
    monkeypatch.setattr(embed, "embed_speed", lambda *a: pytest.fail("measured"))
    one_error_line(invoke("bench", "embed", "--model", "dec", "--phrasebank", str(phrasebank)),
                   "dec: the embedding benchmark needs an encoder model")
    one_error_line(invoke("bench", "embed", "--phrasebank", str(tmp_path / "none.jsonl")), "--phrasebank", "none.jsonl")


def test_speculative_runs_every_proposer_at_every_k_and_compares_each_with_plain(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: f"loaded {model}")
    monkeypatch.setattr(cpu_kernels, "current_path", lambda: "avx2")

    def compare(loaded, settings, workloads, max_tokens, kv_cache_memory):
        seen.update(loaded=loaded, settings=settings, workloads=workloads, max_tokens=max_tokens, kv=kv_cache_memory)
        return {"code editing": [Run("plain", 40, 2.0, [[1, 2], [3, 4]]),
                                 Run("ngram x2", 40, 1.0, [[1, 2], [3, 5]], acceptance=0.75, tokens_per_check=2.5)]}

    monkeypatch.setattr(speculative, "compare", compare)
    out = invoke("bench", "speculative", "--model", "big", "--proposer", "ngram", "--proposer", "small", "--k", "2",
                 "--k", "5", "--edit-prompts", "2", "--chat-prompts", "0", "--max-tokens", "4", "--kv-cache-memory", "64MiB")
    assert out.returncode == 0, out.stderr
    assert seen == {"loaded": "loaded big", "settings": [("ngram", 2), ("ngram", 5), ("small", 2), ("small", 5)],
                    "workloads": {"code editing": speculative.EDIT_PROMPTS[:2]}, "max_tokens": 4, "kv": "64MiB"}
    assert "CPU kernels avx2; draft model small;" in out.stdout
    assert "code editing: 2 prompts, 40 tokens" in out.stdout
    assert table_rows(out.stdout) == [["plain", "19.0", "1.00x", "", "", "2 of 2"],  # (40 - 2 first tokens) / 2.0 s
                                      ["ngram x2", "38.0", "2.00x", "75%", "2.50", "1 of 2"]]


def test_speculative_through_the_server_prints_each_setting_against_plain(monkeypatch) -> None:
    seen = {}
    tokenizer = SimpleNamespace(apply_chat_template=lambda messages, add_generation_prompt, tokenize:
                                [len(messages[0]["content"]), add_generation_prompt, tokenize])
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(tokenizer=tokenizer))

    def serve_compare(model, settings, prompts, levels, max_tokens, kv_cache_memory, logs):
        seen.update(model=model, settings=settings, prompts=prompts, levels=levels, max_tokens=max_tokens)
        plain = {c: SimpleNamespace(tokens_per_second=10.0 * c, percentile=lambda which, q: {"ttft": 250.0, "itl": 40.0}[which] + q)
                 for c in levels}
        fast = {c: SimpleNamespace(tokens_per_second=15.0 * c, percentile=lambda which, q: 1.0) for c in levels}
        return {"plain": plain, "ngram x3": fast}

    monkeypatch.setattr(speculative, "serve_compare", serve_compare)
    out = invoke("bench", "speculative", "--serve", "--model", "big", "--proposer", "ngram", "--k", "3",
                 "--edit-prompts", "1", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert seen == {"model": "big", "settings": [("ngram", 3)], "levels": [1, 8], "max_tokens": 8,
                    "prompts": [[len(speculative.EDIT_PROMPTS[0]), True, True]]}
    assert table_rows(out.stdout) == [["plain", "1", "10.0", "1.00x", "300", "90", "139"],
                                      ["plain", "8", "80.0", "1.00x", "300", "90", "139"],
                                      ["ngram x3", "1", "15.0", "1.50x", "1", "1", "1"],
                                      ["ngram x3", "8", "120.0", "1.50x", "1", "1", "1"]]


def test_deterministic_prints_both_modes_and_the_cost_of_each_measure(monkeypatch) -> None:
    seen = {"invariance": []}
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: f"loaded {model}")
    monkeypatch.setattr(cpu_kernels, "current_path", lambda: "avx2")

    def invariance(loaded, prompts, max_tokens, kv_cache_memory, deterministic_mode):
        seen["invariance"].append((loaded, prompts, max_tokens, kv_cache_memory, deterministic_mode))
        mode = "deterministic" if deterministic_mode else "default"
        return Invariance(mode, 2, {"batch of 32": 2 if deterministic_mode else 1}, {"batch of 32": 2 if deterministic_mode else 0})

    def cost(loaded, prompt, batches, steps, rounds, kv_cache_memory):
        seen["cost"] = (loaded, prompt, batches, steps, rounds, kv_cache_memory)
        return Cost(100, {"default": 0.002, "deterministic": 0.003},
                    {"default": {1: 0.010, 4: 0.020}, "deterministic": {1: 0.012, 4: 0.030}})

    monkeypatch.setattr(deterministic, "invariance", invariance)
    monkeypatch.setattr(deterministic, "cost", cost)
    out = invoke("bench", "deterministic", "--model", "q", "--prompts", "2", "--max-tokens", "3", "--batch", "1",
                 "--batch", "4", "--rounds", "2", "--kv-cache-memory", "64MiB")
    assert out.returncode == 0, out.stderr
    prompts = deterministic.MEASURED_PROMPTS[:2]
    assert seen["invariance"] == [("loaded q", prompts, 3, "64MiB", False), ("loaded q", prompts, 3, "64MiB", True)]
    assert seen["cost"] == ("loaded q", deterministic.LONG_PROMPT, [1, 4], 16, 2, "64MiB")
    assert table_rows(out.stdout) == [
        ["default", "batch of 32", "1 of 2", "0 of 2"],
        ["deterministic", "batch of 32", "2 of 2", "2 of 2"],
        ["prompt processing, per token (100-token prompt)", "2.00", "3.00", "1.50x"],
        ["decode step, 1 sequences", "10.0", "12.0", "1.20x"],
        ["decode step, 4 sequences", "20.0", "30.0", "1.50x"],
    ]


@pytest.mark.parametrize(("args", "parts"), [
    (["--prompts", "0"], ["--prompts must be 1 to 20; got 0"]),
    (["--prompts", "21"], ["--prompts must be 1 to 20; got 21"]),
    (["--max-tokens", "0"], ["--max-tokens must be at least 1; got 0"]),
    (["--batch", "8", "--batch", "0"], ["--batch must be at least 1; got 0"]),
    (["--rounds", "0"], ["--rounds must be at least 1; got 0"]),
])
def test_deterministic_bad_counts_are_refused_before_loading(monkeypatch, args, parts) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    one_error_line(invoke("bench", "deterministic", *args), *parts)
