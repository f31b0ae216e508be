"""The `lmk` command line, run the way a user runs it: in a process of its own where it streams,
reads stdin or writes a model; in this process (the same entry point, without paying for another
torch import) where it only answers or refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lmkernel.cli import app

LMK = [sys.executable, "-m", "lmkernel.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMK, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})


def invoke(*args: str) -> SimpleNamespace:
    """`lmk ARGS` in this process: its exit code, stdout and stderr, the way `run` gives them."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def test_models_lists_installed_aliases(smollm_gguf, minilm_dir):
    out = invoke("models")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m-instruct" in out.stdout and "all-minilm-l6-v2" in out.stdout
    assert out.stdout.count("yes") == 2 and smollm_gguf.name in out.stdout


def test_info_prints_the_model_facts():
    out = invoke("info", "smollm2-135m-instruct")
    assert out.returncode == 0, out.stderr
    for fact in ("llama", "134,515,008", "Q4_1", "49152", "8192", "chat template"):
        assert fact in out.stdout, fact


def test_info_on_bad_input_is_one_clear_line(tmp_path):
    out = invoke("info", str(tmp_path / "nothing-here"))
    assert out.returncode == 1
    assert "error:" in out.stderr and "nothing-here" in out.stderr and "Traceback" not in out.stderr


def test_generate_streams_the_greedy_completion():
    from lmkernel import LLM, SamplingParams

    out = run("generate", "smollm2-135m-instruct", "The capital of France is", "--max-tokens", "10", "--temperature", "0", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    expected = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", verbose=False).generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=10)
    )[0].outputs[0].text
    assert out.stdout.rstrip("\n") == expected


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_generate_with_speculative_decoding_streams_the_same_completion():
    from lmkernel import LLM, SamplingParams

    prompt = "List: red, green, blue, red, green, blue, red, green,"
    out = run("generate", "smollm2-135m-instruct", prompt, "--max-tokens", "24", "--temperature", "0", "--device", "cpu",
              "--speculative-model", "ngram", "--num-speculative-tokens", "3")
    assert out.returncode == 0, out.stderr
    expected = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", verbose=False).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    assert out.stdout.rstrip("\n") == expected
    assert "speculative decoding: prompt lookup" in out.stderr and "proposed tokens accepted" in out.stderr
    bad = invoke("generate", "smollm2-135m-instruct", "x", "--speculative-model", "ngram", "--num-speculative-tokens", "0")
    assert bad.returncode == 1 and "--num-speculative-tokens" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_chat_keeps_history_and_quits():
    out = subprocess.run(
        [*LMK, "chat", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"],
        input="Say hi.\nAnd again?\nexit\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("you> ") == 3 and out.stdout.count("assistant> ") == 2


def test_generate_rejects_bad_values_in_one_line():
    out = invoke("generate", "smollm2-135m-instruct", "x", "--temperature", "-1")
    assert out.returncode == 1 and "temperature" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # quantizes, evaluates and generates in three processes: make test runs it, make test-fast not
def test_quantize_then_evaluate_and_generate_from_the_directory(tmp_path, smollm, wikitext_lines):
    out_dir = tmp_path / "smollm-int8"
    out = run("quantize", "smollm2-135m-instruct", "--method", "int8", "-o", str(out_dir))
    assert out.returncode == 0, out.stderr
    assert (out_dir / "model.safetensors").is_file() and "210 linear layers" in out.stdout
    data = tmp_path / "text.txt"
    data.write_text("\n".join(wikitext_lines[:30]))
    out = run("eval", "perplexity", str(out_dir), "--data", str(data), "--max-tokens", "300", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 299 and 1 < result["perplexity"] < 100
    out = run("generate", str(out_dir), "The capital of France is", "--max-tokens", "4", "--temperature", "0")
    assert out.returncode == 0 and "Paris" in out.stdout, out.stderr

    # Refusals (an existing directory, re-quantizing) are tested in tests/compress; here, the one line.
    bad = invoke("quantize", "smollm2-135m-instruct", "--method", "int4", "--group-size", "100", "-o", str(tmp_path / "x"))
    assert bad.returncode == 1 and "--group-size" in bad.stderr and not (tmp_path / "x").exists()
    assert "Traceback" not in bad.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = invoke("eval", "perplexity", "smollm2-135m-instruct", "--data", str(empty))
    assert out.returncode == 1 and "empty" in out.stderr


@pytest.mark.slow  # calibration: make test runs it, make test-fast not
def test_quantize_int4_refines_on_the_given_calibration_text(tmp_path, wikitext_lines):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(wikitext_lines[:12]))
    out_dir = tmp_path / "smollm-int4"
    # Only the last layer in int4 (the rest skipped), to keep the run short.
    float_layers = ("--skip", "lm_head", "--skip", "model.layers.[0-9].*", "--skip", "model.layers.1?.*", "--skip", "model.layers.2[0-8].*")
    out = run("quantize", "smollm2-135m-instruct", "--method", "int4", "--rounding", "nearest", "--refine-steps", "1",
              "--calibration-sequences", "1", "--calibration", str(calibration), *float_layers, "-o", str(out_dir))
    assert out.returncode == 0, out.stderr
    assert "refined int4 scales/minimums" in out.stdout and "over 1 steps" in out.stdout
    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["rounding"] == "nearest" and config["refine_steps"] == 1 and config["group_size"] == 128
    assert len(config["quantized_modules"]) == 7 and all(m.startswith("model.layers.29.") for m in config["quantized_modules"])

    bad = invoke("quantize", "smollm2-135m-instruct", "--method", "int8", "--refine-steps", "3", "-o", str(tmp_path / "y"))
    assert bad.returncode == 1 and "--refine-steps applies to int4" in bad.stderr and not (tmp_path / "y").exists()


def test_prune_refuses_bad_sparsity_and_writes_nothing(tmp_path):
    out = invoke("prune", "smollm2-135m-instruct", "--method", "magnitude", "--sparsity", "1.5", "-o", str(tmp_path / "p"))
    assert out.returncode == 1 and "--sparsity" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_starts_without_torch() -> None:
    """`import lmkernel` and the CLI module load torch only when a command needs it (`lmk --help` and
    `lmk models` answer in about half a second here, against six with torch)."""
    code = ("import sys, lmkernel, lmkernel.cli; from lmkernel import LmkError; "
            "assert 'torch' not in sys.modules, 'torch was imported'; lmkernel.SamplingParams; "
            "assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
