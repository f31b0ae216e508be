"""lmkernel.cli.bench_engine (`lmk bench decode-steps, kv-memory, structured, compress`): arguments handed on, tables and ratios, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_output import one_error_line, table_rows
from test_cli import invoke

import lmkernel.bench.workload
import lmkernel.engine.llm
import lmkernel.loading
from lmkernel.bench import compress, decode_steps, kv_memory, structured
from lmkernel.bench.compress import VariantResult
from lmkernel.bench.decode_steps import StepCost
from lmkernel.bench.kv_memory import KVMemoryRow, KVMemoryRun
from lmkernel.bench.structured import MaskCost
from lmkernel.errors import LmkError
from lmkernel.layers import cpu_kernels

MIB = 1 << 20


@pytest.fixture
def calls(monkeypatch) -> dict:
    """An LLM, a loader and a workload that record their arguments and load nothing."""
    seen: dict = {}

    class FakeLLM:
        def __init__(self, model, **kwargs) -> None:
            seen["LLM"] = (model, kwargs)
            self.tokenizer = "TOKENIZER"

    def text_workload(tokenizer, n, prompt_span, output_span, seed=0, **kwargs):
        seen.setdefault("workload", []).append((tokenizer, n, prompt_span, output_span, kwargs))
        return SimpleNamespace(prompts=[[7] * prompt_span[0]] * n)

    monkeypatch.setattr(lmkernel.engine.llm, "LLM", FakeLLM)
    monkeypatch.setattr(lmkernel.bench.workload, "text_workload", text_workload)
    monkeypatch.setattr(cpu_kernels, "current_path", lambda: "avx2")
    return seen


def test_decode_steps_sizes_the_engine_for_the_largest_batch_and_prints_each_step_against_the_first(monkeypatch, calls) -> None:
    def step_costs(llm, prompts, sizes, new_tokens, rounds):
        calls["steps"] = (len(prompts), sizes, new_tokens, rounds)
        return [StepCost(1, 20.0, 25.0), StepCost(4, 40.0, None)]

    monkeypatch.setattr(decode_steps, "step_costs", step_costs)
    out = invoke("bench", "decode-steps", "--model", "m", "--batch", "1", "--batch", "4", "--new-tokens", "3",
                 "--rounds", "2")
    assert out.returncode == 0, out.stderr
    assert calls["LLM"] == ("m", {"kv_cache_memory": "1GiB", "verbose": False, "enable_prefix_caching": False,
                                  "max_num_seqs": 4})
    assert calls["workload"] == [("TOKENIZER", 4, (64, 64), (1, 1), {})]
    assert calls["steps"] == (4, [1, 4], 3, 2)
    assert "medians of 2 alternating rounds, 64-token prompts, 3 tokens each" in out.stdout
    assert "step / step of 1" in out.stdout
    assert table_rows(out.stdout) == [["1", "20.0 ms", "50.0", "1.00x", "25.0 ms", "40.0"],
                                      ["4", "40.0 ms", "100.0", "2.00x", "", ""]]


@pytest.mark.parametrize("command", ["decode-steps", "structured"])
def test_a_batch_size_below_one_is_refused_before_loading(monkeypatch, command) -> None:
    monkeypatch.setattr(lmkernel.engine.llm, "LLM", lambda *a, **k: pytest.fail("loaded a model"))
    one_error_line(invoke("bench", command, "--batch", "2", "--batch", "0"), "--batch", "got 0")


@pytest.mark.parametrize(("args", "got"), [(["--context", "16", "--context", "0"], "got 0 and 16"),
                                           (["--new-tokens", "0"], "got 1024 and 0")])
def test_kv_memory_refuses_an_empty_prompt_or_no_new_tokens_before_loading(monkeypatch, args, got) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    one_error_line(invoke("bench", "kv-memory", *args), "--context and --new-tokens must be at least 1", got)


def test_kv_memory_cuts_a_prompt_per_context_and_prints_both_caches(monkeypatch, tmp_path: Path) -> None:
    seen = {"workload": []}
    text = tmp_path / "valid.txt"
    text.write_text("some text\n")
    config = SimpleNamespace(num_layers=4, window=lambda i: 512 if i % 2 == 0 else None)
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(tokenizer="TOK", config=config))

    def text_workload(tokenizer, n, prompt_span, output_span, seed=0, text_file=None):
        seen["workload"].append((tokenizer, n, prompt_span, output_span, text_file))
        return SimpleNamespace(prompts=[[1] * prompt_span[0]])

    def measure(loaded, prompts, new_tokens, kv_cache_memory, max_num_batched_tokens):
        seen["measure"] = ([len(p) for p in prompts], new_tokens, kv_cache_memory, max_num_batched_tokens)
        return [KVMemoryRow(8, KVMemoryRun(3 * MIB, 2 * MIB, (1, 2), 1.25), KVMemoryRun(8 * MIB, 6 * MIB, (1, 2), 2.5), 6 * MIB),
                KVMemoryRow(16, KVMemoryRun(4 * MIB, 4 * MIB, (1, 2), 1.0), KVMemoryRun(10 * MIB, 10 * MIB, (1, 3), 2.0),
                            12 * MIB)]

    monkeypatch.setattr(lmkernel.bench.workload, "text_workload", text_workload)
    monkeypatch.setattr(kv_memory, "measure", measure)
    out = invoke("bench", "kv-memory", "--model", "g", "--context", "8", "--context", "16", "--new-tokens", "2",
                 "--max-num-batched-tokens", "32", "--kv-cache-memory", "64MiB", "--text", str(text))
    assert out.returncode == 0, out.stderr
    assert seen["workload"] == [("TOK", 1, (8, 8), (1, 1), text), ("TOK", 1, (16, 16), (1, 1), text)]
    assert seen["measure"] == ([8, 16], 2, "64MiB", 32)
    assert out.stdout.startswith("g: 4 layers, 2 with a sliding window of [512]; KV bytes one sequence holds while it "
                                 "decodes 2 greedy tokens")
    assert table_rows(out.stdout) == [
        ["8", "2.0 MiB", "6.0 MiB", "3.00x", "3.0 MiB", "8.0 MiB", "6.0 MiB", "yes", "1.2", "2.5"],
        ["16", "4.0 MiB", "10.0 MiB", "2.50x", "4.0 MiB", "10.0 MiB", "12.0 MiB", "NO", "1.0", "2.0"],
    ]


def test_kv_memory_without_the_text_names_the_option(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(tokenizer="TOK"))
    monkeypatch.setattr(kv_memory, "measure", lambda *a: pytest.fail("measured"))
    one_error_line(invoke("bench", "kv-memory", "--text", str(tmp_path / "missing.txt")), "--text", "missing.txt")


def test_structured_measures_each_batch_and_prints_the_mask_cost(monkeypatch, calls) -> None:
    def mask_cost(llm, prompts, batch, new_tokens, rounds):
        calls.setdefault("cost", []).append((len(prompts), batch, new_tokens, rounds))
        return MaskCost(batch, 10.0 * batch, 11.5 * batch if batch == 1 else 19.6, 0.15 if batch == 1 else -0.02)

    monkeypatch.setattr(structured, "mask_cost", mask_cost)
    out = invoke("bench", "structured", "--model", "q", "--batch", "1", "--batch", "2", "--new-tokens", "4", "--rounds", "3")
    assert out.returncode == 0, out.stderr
    assert calls["LLM"] == ("q", {"kv_cache_memory": "512MiB", "verbose": False, "enable_prefix_caching": False})
    assert calls["workload"] == [("TOKENIZER", 2, (64, 64), (1, 1), {})]
    assert calls["cost"] == [(2, 1, 4, 3), (2, 2, 4, 3)]
    assert table_rows(out.stdout) == [["1", "10.00 ms", "11.50 ms", "+15.0%"], ["2", "20.00 ms", "19.60 ms", "-2.0%"]]


def _variant(name: str, size: float, rss: float, quality: float, speeds: tuple, speedup: tuple) -> VariantResult:
    return VariantResult(name, int(size), int(rss), quality, *speeds, speedup=speedup)


def test_compress_prints_each_variant_against_the_first(monkeypatch, tmp_path: Path) -> None:
    seen = {}
    text, phrasebank = tmp_path / "valid.txt", tmp_path / "valid.jsonl"
    text.write_text("words\n")
    phrasebank.write_text('{"text": "Up."}\n{"text": "Down."}\n{"text": "Flat."}\n')

    def run_decoder(model, work, wikitext, max_tokens, calibration, log):
        seen["decoder"] = (model, work.name, work.is_dir(), wikitext, max_tokens, calibration)
        log("packing the q4 variant")
        return [_variant("float32", 500e6, 800e6, 20.0, (10.0, 80.0, 1000.0), (1.0, 1.0, 1.0)),
                _variant("q4", 125e6, 300e6, 21.0, (25.0, 150.0, 800.0), (2.5, 1.875, 0.8))]

    def run_encoder(model, work, texts, log):
        seen["encoder"] = (model, work.name, texts)
        return [_variant("float32", 90e6, 200e6, 1.0, (50.0, 400.0, 5000.0), (1.0, 1.0, 1.0)),
                _variant("int8", 30e6, 120e6, 0.9985, (60.0, 500.0, 6000.0), (1.2, 1.25, 1.2))]

    monkeypatch.setattr(compress, "run_decoder", run_decoder)
    monkeypatch.setattr(compress, "run_encoder", run_encoder)
    out = invoke("bench", "compress", "--model", "dec", "--encoder", "enc", "--max-tokens", "64",
                 "--calibration-sequences", "2", "--sentences", "2", "--text", str(text), "--phrasebank", str(phrasebank))
    assert out.returncode == 0, out.stderr
    assert seen["decoder"] == ("dec", "dec", True, text, 64, 2)
    assert seen["encoder"] == ("enc", "enc", ["Up.", "Down."])
    assert "packing the q4 variant" in out.stdout
    assert "dec: perplexity on the first 64 WikiText-2 tokens" in out.stdout
    assert "enc: 2 PhraseBank sentences, cosine to float32" in out.stdout
    assert table_rows(out.stdout) == [
        ["float32", "500.0 (1.00x)", "800", "20.0000 (+0.00%)", "10.0 (1.00x)", "80.0 (1.00x)", "1000 (1.00x)"],
        ["q4", "125.0 (4.00x)", "300", "21.0000 (+5.00%)", "25.0 (2.50x)", "150.0 (1.88x)", "800 (0.80x)"],
        ["float32", "90.0 (1.00x)", "200", "1.0000 (+0.00%)", "50.0 (1.00x)", "400.0 (1.00x)", "5000 (1.00x)"],
        ["int8", "30.0 (3.00x)", "120", "0.9985 (-0.15%)", "60.0 (1.20x)", "500.0 (1.25x)", "6000 (1.20x)"],
    ]


def test_compress_reports_a_failed_variant_as_one_line(monkeypatch, tmp_path: Path) -> None:
    text, phrasebank = tmp_path / "valid.txt", tmp_path / "valid.jsonl"
    text.write_text("words\n")
    phrasebank.write_text('{"text": "Up."}\n')

    def run_decoder(*args):
        raise LmkError("dec: GPTQ needs calibration windows")

    monkeypatch.setattr(compress, "run_decoder", run_decoder)
    one_error_line(invoke("bench", "compress", "--text", str(text), "--phrasebank", str(phrasebank)),
                   "GPTQ needs calibration windows")
