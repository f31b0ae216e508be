"""`lmk quantize` and `lmk prune` (lmkernel/cli/compress.py): the settings they hand to the compression library, the
calibration windows they read, the lines they print, and bad values refused in one line with nothing written."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from test_cli import invoke, run

from lmkernel.cli.compress import CALIBRATION_LENGTH, calibration_source
from lmkernel.errors import LmkError


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


class CountingTokenizer:
    """Token i for the i-th character: windows of a text are easy to work out by hand."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return list(range(len(text)))


def fake_model(is_encoder: bool = False) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=CountingTokenizer(), config=SimpleNamespace(is_encoder=is_encoder),
                           source=SimpleNamespace(path="/models/m"), model="weights", dtype="float32")


def test_calibration_windows_come_from_the_text_file(tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("x" * 300)
    assert CALIBRATION_LENGTH == 128
    windows = calibration_source(text, 2)(fake_model())
    assert windows == [list(range(0, 128)), list(range(128, 256))]
    windows = calibration_source(text, 5)(fake_model())  # the text runs out after two and a bit windows
    assert windows == [list(range(0, 128)), list(range(128, 256)), list(range(256, 300))]


def test_without_a_text_the_model_writes_its_calibration_only_when_asked(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("lmkernel.compress.calibrate.generated_sequences",
                        lambda lm, count, length: calls.append((lm, count, length)) or [[1, 2]] * count)
    source = calibration_source(None, 3)
    assert calls == []
    lm = fake_model()
    assert source(lm) == [[1, 2]] * 3 and calls == [(lm, 3, 128)]
    assert " ".join(capsys.readouterr().err.split()) == (
        "calibration: generating 3 sequences of 128 tokens with the model (--calibration FILE calibrates on a text instead)")
    with pytest.raises(LmkError, match=r"^/models/m: an encoder cannot generate its calibration text; pass --calibration FILE$"):
        source(fake_model(is_encoder=True))
    assert len(calls) == 1


def test_an_empty_calibration_file_names_the_calibration_option(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(LmkError, match=f"^--calibration {re.escape(str(empty))}: the file is empty$"):
        calibration_source(empty, 2)(fake_model())


@pytest.fixture
def quantize_calls(monkeypatch):
    """`quantize_pipeline` replaced: it records its arguments, writes 1.5 MB into the output and reports three
    layers quantized (and, for int4 with refinement, 4 steps of KL 0.12345 -> 0.01234)."""
    from lmkernel.compress.pipeline import QuantizeResult
    from lmkernel.compress.refine import RefineResult

    calls = []

    def fake(model, settings, output, calibration, overwrite=False, dtype="float32", device="cpu", log=None):
        calls.append(SimpleNamespace(model=model, settings=settings, output=output, calibration=calibration,
                                     overwrite=overwrite, dtype=dtype, device=device))
        output.mkdir()
        (output / "model.safetensors").write_bytes(b"\0" * 1_000_000)
        (output / "config.json").write_bytes(b"\0" * 500_000)
        done = SimpleNamespace(rounding=settings.rounding, quantized=["a", "b", "c"])
        refined = RefineResult(4, 0.12345, 0.01234) if settings.refine_steps else None
        return QuantizeResult(done, output, refined)

    monkeypatch.setattr("lmkernel.compress.pipeline.quantize_pipeline", fake)
    return calls


def test_quantize_hands_its_options_to_the_pipeline_and_reports_the_result(quantize_calls, tmp_path):
    from lmkernel.compress.pipeline import QuantizeSettings

    text = tmp_path / "calibration.txt"
    text.write_text("y" * 200)
    out_dir = tmp_path / "q"
    out = invoke("quantize", "m", "--method", "int4", "--group-size", "64", "--refine-steps", "4", "--skip", "lm_head",
                 "--skip", "model.layers.0.*", "--dtype", "bfloat16", "--overwrite", "--calibration", str(text),
                 "--calibration-sequences", "1", "-o", str(out_dir))
    assert out.returncode == 0, out.stderr
    (call,) = quantize_calls
    assert call.settings == QuantizeSettings("int4", 64, "gptq", 4, ("lm_head", "model.layers.0.*"))
    assert (call.model, call.output, call.overwrite, call.dtype, call.device) == ("m", out_dir, True, "bfloat16", "cpu")
    assert call.calibration(fake_model()) == [list(range(128))]  # one window of the given text
    assert out.stdout.splitlines() == [
        "refined int4 scales/minimums: KL to float 0.1235 -> 0.0123 nats/token over 4 steps",
        f"int4 (gptq): 3 linear layers quantized; wrote {out_dir} (1.5 MB)"]


def test_quantize_defaults(quantize_calls, tmp_path):
    from lmkernel.compress.pipeline import QuantizeSettings
    from lmkernel.compress.quantize import DEFAULT_SKIP

    out = invoke("quantize", "m", "--method", "int8", "-o", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    (call,) = quantize_calls
    assert call.settings == QuantizeSettings("int8", 128, "gptq", None, DEFAULT_SKIP)
    assert (call.overwrite, call.dtype, call.device) == (False, "float32", "cpu")
    assert out.stdout == f"int8 (gptq): 3 linear layers quantized; wrote {tmp_path / 'q'} (1.5 MB)\n"


@pytest.mark.parametrize("args, message", [
    (["--method", "int3"], "--method must be one of int8, int4, int8-dynamic; got 'int3'"),
    (["--method", "int4", "--group-size", "100"], "--group-size must be one of (32, 64, 128, 256) for int4; got 100"),
    (["--method", "int4", "--rounding", "fancy"], "--rounding must be gptq or nearest; got 'fancy'"),
    (["--method", "int4", "--refine-steps", "-1"], "--refine-steps applies to int4 and must be >= 0; got -1 with --method int4"),
])
def test_quantize_refuses_bad_settings_before_loading(monkeypatch, tmp_path, args, message):
    monkeypatch.setattr("lmkernel.compress.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = invoke("quantize", "m", *args, "-o", str(tmp_path / "q"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_quantize_and_prune_refuse_a_full_output_directory(monkeypatch, tmp_path):
    monkeypatch.setattr("lmkernel.compress.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("lmkernel.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for command in (["quantize", "m", "--method", "int8"], ["prune", "m", "--method", "magnitude", "--sparsity", "0.5"]):
        out = invoke(*command, "-o", str(full))
        assert out.returncode == 1
        assert out.stderr == f"error: -o {full}: already exists and is not empty; pass --overwrite to replace it\n"
        assert [p.name for p in full.iterdir()] == ["keep.txt"]


@pytest.fixture
def prune_calls(monkeypatch):
    """The model loading, pruning and saving `lmk prune` calls, replaced by recorders with fixed reports."""
    from lmkernel.compress.prune import PruneReport, StructuredReport

    calls = SimpleNamespace(loaded=[], unstructured=[], structured=[], saved=[], lm=fake_model(), smaller=fake_model())
    calls.smaller.model = "smaller weights"

    def load(model, **kwargs):
        calls.loaded.append((model, kwargs))
        return calls.lm

    def unstructured(lm, method, sparsity, seqs):
        calls.unstructured.append((lm, method, sparsity, seqs))
        return PruneReport(method, sparsity, ["l1", "l2"], zeros=250, weights=1000)

    def structured(lm, seqs, ffn, heads, layers):
        calls.structured.append((lm, seqs, ffn, heads, layers))
        return calls.smaller, StructuredReport((1536, 768), (9, 6), [3, 7], (134_515_008, 90_000_000))

    monkeypatch.setattr("lmkernel.loading.load_model", load)
    monkeypatch.setattr("lmkernel.compress.prune.prune_unstructured", unstructured)
    monkeypatch.setattr("lmkernel.compress.prune.prune_structured", structured)
    monkeypatch.setattr("lmkernel.loader.hf_export.save_model_dir", lambda *args: calls.saved.append(args))
    return calls


def test_prune_magnitude_zeroes_without_calibration_and_saves(prune_calls, tmp_path):
    out = invoke("prune", "m", "--method", "magnitude", "--sparsity", "0.25", "--overwrite", "-o", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    lm = prune_calls.lm
    assert prune_calls.loaded == [("m", {"quantization": None})]
    assert prune_calls.unstructured == [(lm, "magnitude", 0.25, None)]
    assert prune_calls.saved == [(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / "p", True)]
    assert out.stdout == f"magnitude: 2 layers, 25.0% of their weights are zero; wrote {tmp_path / 'p'}\n"


def test_prune_wanda_calibrates_on_the_text(prune_calls, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("z" * 256)
    out = invoke("prune", "m", "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text),
                 "--calibration-sequences", "2", "-o", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    assert prune_calls.unstructured == [(prune_calls.lm, "wanda", 0.5, [list(range(128)), list(range(128, 256))])]
    assert prune_calls.saved[0][4:] == (tmp_path / "p", False)


def test_prune_structured_saves_the_smaller_model(prune_calls, tmp_path, monkeypatch):
    monkeypatch.setattr("lmkernel.compress.calibrate.generated_sequences", lambda lm, count, length: [[5] * length] * count)
    out = invoke("prune", "m", "--method", "structured", "--ffn", "0.5", "--heads", "0.34", "--layers", "2",
                 "--calibration-sequences", "1", "-o", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    assert prune_calls.structured == [(prune_calls.lm, [[5] * 128], 0.5, 0.34, 2)]
    small = prune_calls.smaller
    assert prune_calls.saved == [("smaller weights", small.config, small.tokenizer, small.dtype, tmp_path / "p", False)]
    assert out.stdout == (f"structured: FFN 1536 -> 768 channels, query heads 9 -> 6, layers removed [3, 7]; "
                          f"parameters 134.5M -> 90.0M; wrote {tmp_path / 'p'}\n")


@pytest.mark.parametrize("args, message", [
    (["--method", "random"], "--method must be magnitude, wanda or structured; got 'random'"),
    (["--method", "wanda"], "--method wanda needs --sparsity in [0, 1) (the fraction of each row to zero); got None"),
    (["--method", "magnitude", "--sparsity", "-0.1"],
     "--method magnitude needs --sparsity in [0, 1) (the fraction of each row to zero); got -0.1"),
])
def test_prune_refuses_bad_settings_before_loading(prune_calls, tmp_path, args, message):
    out = invoke("prune", "m", *args, "-o", str(tmp_path / "p"))
    assert out.returncode == 1 and out.stdout == "" and out.stderr == f"error: {message}\n"
    assert prune_calls.loaded == [] and list(tmp_path.iterdir()) == []


def test_a_pruning_error_is_one_line_and_nothing_is_saved(prune_calls, tmp_path, monkeypatch):
    def refuse(lm, seqs, ffn, heads, layers):
        raise LmkError("--layers must be in [0, 29] for this 30-layer model; got 30")

    monkeypatch.setattr("lmkernel.compress.prune.prune_structured", refuse)
    monkeypatch.setattr("lmkernel.compress.calibrate.generated_sequences", lambda lm, count, length: [[5, 6]])
    out = invoke("prune", "m", "--method", "structured", "--layers", "30", "-o", str(tmp_path / "p"))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == "error: --layers must be in [0, 29] for this 30-layer model; got 30"
    assert prune_calls.saved == []
