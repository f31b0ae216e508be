"""lmkernel.bench.compress: the compressed variants' sizes, memory and speeds, and its child entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

import lmkernel.engine.llm
from lmkernel.bench import compress
from lmkernel.bench.compress import PREFILL_TOKENS, VariantResult, resident_bytes, size_on_disk, time_decoders
from lmkernel.errors import LmkError


def test_a_variants_speeds_are_decode_at_1_and_16_then_prefill() -> None:
    r = VariantResult("int8", 10, 20, 7.5, 30.0, 400.0, 2000.0)
    assert r.speeds() == (30.0, 400.0, 2000.0) and r.speedup == (1.0, 1.0, 1.0)


def test_size_on_disk_is_a_files_size_or_every_file_under_a_directory(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model" / "config.json").write_bytes(b"{}")
    (tmp_path / "model" / "tokenizer").mkdir()
    (tmp_path / "model" / "tokenizer" / "vocab.txt").write_bytes(b"a\nb\n")
    (tmp_path / "model" / "empty").mkdir()
    assert size_on_disk(tmp_path / "model") == 1006
    assert size_on_disk(tmp_path / "model" / "weights.safetensors") == 1000


def test_resident_bytes_is_the_processes_rss() -> None:
    assert abs(resident_bytes() - psutil.Process().memory_info().rss) < 8 << 20


def test_best_is_the_least_of_its_rounds() -> None:
    times = iter([0.3, 0.1, 0.2, 0.05])
    assert compress._best(lambda: next(times)) == 0.1
    assert next(times) == 0.05  # three rounds taken, not four


def test_decoder_speeds_are_medians_and_speedups_medians_of_back_to_back_ratios(monkeypatch) -> None:
    """Two variants, two rounds. Prefill s (3 a round): base 0.5 x 6; other 0.25 x 3 then 1.0 x 3, median 0.625,
    ratios 2 x 3 and 0.5 x 3, median 1.25. Decode step s at batch 1: base 0.01, 0.02; other 0.005, 0.02 (speed-up
    median of 2 and 1); at 16: base 0.1, 0.1; other 0.2, 0.05 (median of 0.5 and 2)."""
    seconds = {"prefill": {"base": [0.5] * 6, "other": [0.25] * 3 + [1.0] * 3},
               1: {"base": [0.01, 0.02], "other": [0.005, 0.02]}, 16: {"base": [0.1, 0.1], "other": [0.2, 0.05]}}
    log, made = [], []
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: list(range(1000)))

    def loading(path, quantization):
        made.append((path, quantization))
        return SimpleNamespace(name=path.name, tokenizer=tokenizer)

    def prefill(lm, ids):
        assert ids == list(range(PREFILL_TOKENS))
        log.append(("prefill", lm.name))
        return seconds["prefill"][lm.name].pop(0)

    def decode(engine, prompts):
        assert prompts == [list(range(i * 32, i * 32 + 32)) for i in range(len(prompts))]
        log.append((len(prompts), engine.name))
        return seconds[len(prompts)][engine.name].pop(0)

    monkeypatch.setattr(compress, "load_model", loading)
    monkeypatch.setattr(lmkernel.engine.llm, "LLM", lambda lm, **kwargs: SimpleNamespace(engine=SimpleNamespace(name=lm.name)))
    monkeypatch.setattr(compress, "_prefill_seconds", prefill)
    monkeypatch.setattr(compress, "_decode_seconds", decode)
    results = [VariantResult(name, 1, 2, 3.0, 0.0, 0.0, 0.0) for name in ("base", "other")]
    rounds: list[str] = []
    time_decoders([("base", Path("base"), None), ("other", Path("other"), "keep")], results, "text", rounds.append, rounds=2)
    assert made == [(Path("base"), None), (Path("other"), "keep")]
    assert rounds == ["timing round 1 of 2", "timing round 2 of 2"]
    one_round = [("prefill", "base"), ("prefill", "other")] * 3 + [(1, "base"), (16, "base"), (1, "other"), (16, "other")]
    assert log == one_round * 2
    base, other = results
    assert (base.decode_b1, base.decode_b16, base.prefill) == pytest.approx((1 / 0.015, 16 / 0.1, 512 / 0.5))
    assert (other.decode_b1, other.decode_b16, other.prefill) == pytest.approx((1 / 0.0125, 16 / 0.125, 512 / 0.625))
    assert base.speedup == (1.0, 1.0, 1.0)
    assert other.speedup == pytest.approx((1.5, 1.25, 1.25))


def test_a_child_measurement_is_its_last_line_or_an_error_with_its_stderr(monkeypatch) -> None:
    result = VariantResult("float32", 100, 200, 12.5, 1.0, 2.0, 3.0, [1.0, 1.0, 1.0])
    runs = []

    def run(args, capture_output, text, env):
        runs.append((args, env["PYTHONWARNINGS"]))
        ok = args[3] == "good"
        return subprocess.CompletedProcess(args, 0 if ok else 1, "warming\n" + json.dumps(asdict(result)) + "\n" if ok else "",
                                           "" if ok else "x" * 3000 + "Traceback: out of memory\n")

    monkeypatch.setattr(compress.subprocess, "run", run)
    assert compress._child(["good", "--kind", "decoder"]) == result
    assert runs == [([sys.executable, "-m", "lmkernel.bench.compress", "good", "--kind", "decoder"], "ignore")]
    with pytest.raises(LmkError, match=r"^measuring bad failed:\nx+Traceback: out of memory\n$") as err:
        compress._child(["bad", "--kind", "encoder"])
    assert len(str(err.value)) == len("measuring bad failed:\n") + 2000


@pytest.mark.parametrize(("args", "message"), [
    (["model-dir"], "the following arguments are required: --kind"),
    (["model-dir", "--kind", "vision"], "argument --kind: invalid choice: 'vision' (choose from 'decoder', 'encoder')"),
    (["model-dir", "--kind", "decoder", "--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
    (["model-dir", "--kind", "decoder"], "--kind decoder needs --text"),
    (["model-dir", "--kind", "encoder", "--sentences", "s.json"], "--kind encoder needs --sentences and --reference"),
])
def test_the_child_entry_point_names_a_bad_argument(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        compress.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and err.rstrip().endswith(f"error: {message}")


def test_the_child_entry_point_prints_an_encoder_variants_result_as_json(minilm_dir, tmp_path, capsys, monkeypatch) -> None:
    measured = VariantResult("model", 5, 6, 0.99, 10.0, 20.0, 30.0)
    calls = []

    def measure_encoder(path, sentences, reference):
        calls.append((path, sentences, reference.tolist()))
        return measured

    monkeypatch.setattr(compress, "measure_encoder", measure_encoder)
    (tmp_path / "s.json").write_text(json.dumps(["one", "two"]))
    torch.save(torch.tensor([[1.0, 2.0]]), tmp_path / "ref.pt")
    compress.main([str(minilm_dir), "--kind", "encoder", "--sentences", str(tmp_path / "s.json"), "--reference",
                   str(tmp_path / "ref.pt")])
    assert calls == [(minilm_dir, ["one", "two"], [[1.0, 2.0]])]
    assert VariantResult(**json.loads(capsys.readouterr().out)) == VariantResult("model", 5, 6, 0.99, 10.0, 20.0, 30.0, [1.0, 1.0, 1.0])
