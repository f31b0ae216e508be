"""lmkernel.bench.train: training speed over the steady steps, peak memory, the quality run's best evaluation, and its
child entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from lmkernel.bench import train
from lmkernel.bench.train import LORA_SPEC, WARMUP_STEPS, SpeedResult, _peak_rss, _steady_rate


def test_the_steady_rate_counts_the_steps_after_the_warmup() -> None:
    assert WARMUP_STEPS == 3
    times, tokens = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0], [999, 999, 999, 999, 20, 30]  # steps 5 and 6: 50 tokens in 8 - 4 s
    assert _steady_rate(times, tokens) == 12.5


def test_peak_rss_is_the_kernels_high_water_mark() -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    hwm = int(status["VmHWM"].split()[0]) * 1024
    assert abs(_peak_rss() - hwm) < 8 << 20


def _fake_trainer(monkeypatch: pytest.MonkeyPatch, records: list[dict], result: object) -> list:
    """lmkernel.train.trainer with a `train` that writes `records` as the run's metrics.jsonl."""
    calls = []

    def fake_train(args):
        calls.append(args)
        Path(args.output).mkdir(parents=True)
        Path(args.output, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return result

    module = ModuleType("lmkernel.train.trainer")
    module.train = fake_train
    monkeypatch.setitem(sys.modules, "lmkernel.train.trainer", module)
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_our_side_trains_the_steps_asked_and_reports_the_steady_rate(monkeypatch, tmp_path, lora: bool) -> None:
    records = [{"step": i + 1, "elapsed_s": t, "tokens": n, "lr": 1e-4}
               for i, (t, n) in enumerate(zip([0.5, 1.0, 1.5, 2.0, 2.25, 2.5], [10, 10, 10, 10, 300, 200]))]
    calls = _fake_trainer(monkeypatch, records, None)
    got = train.ours("all-minilm-l6-v2", tmp_path / "train.jsonl", 6, 8, lora, tmp_path)
    assert (got.side, got.tokens_per_s, got.steps) == ("lmkernel", 1000.0, 6)  # 500 tokens in 0.5 s
    assert got.peak_rss_bytes > 0
    (args,) = calls
    assert (args.task, args.model, args.data, args.output, args.max_steps, args.batch_size, args.lora) == (
        "classify", "all-minilm-l6-v2", str(tmp_path / "train.jsonl"), str(tmp_path / "ours"), 6, 8, LORA_SPEC if lora else None)
    assert args.save_every >= 10**9  # no checkpoint inside the timed steps


def test_quality_is_the_evaluation_at_the_best_step(monkeypatch, tmp_path) -> None:
    records = [{"step": 10, "accuracy": 0.81, "macro_f1": 0.75},
               {"step": 20, "loss": 0.9, "lr": 1e-4, "accuracy": 0.0, "macro_f1": 0.0},  # training, at the best step: not it
               {"step": 20, "accuracy": 0.85, "macro_f1": 0.74},
               {"step": 30, "accuracy": 0.80, "macro_f1": 0.70}]
    calls = _fake_trainer(monkeypatch, records, SimpleNamespace(best_step=20, steps=30))
    got = train.quality("m", tmp_path / "t.jsonl", tmp_path / "v.jsonl", True, tmp_path)
    assert {k: got[k] for k in ("accuracy", "macro_f1", "steps", "best_step")} == {
        "accuracy": 0.85, "macro_f1": 0.74, "steps": 30, "best_step": 20}
    assert 0 <= got["seconds"] < 60
    (args,) = calls
    assert (args.eval_data, args.output, args.lora, args.max_steps) == (str(tmp_path / "v.jsonl"), str(tmp_path / "lora"), LORA_SPEC, None)


def test_a_child_result_is_its_last_line_or_an_error_with_its_stderr(monkeypatch) -> None:
    runs = []

    def run(args, capture_output, text):
        runs.append(args)
        if args[3] == "ours":
            return subprocess.CompletedProcess(args, 0, 'loading\n{"tokens_per_s": 5.0}\n', "")
        return subprocess.CompletedProcess(args, 1, "", "y" * 4000 + "KeyError: label\n")

    monkeypatch.setattr(train.subprocess, "run", run)
    assert train.run_child("ours", "--model", "m") == {"tokens_per_s": 5.0}
    assert runs == [[sys.executable, "-m", "lmkernel.bench.train", "ours", "--model", "m"]]
    with pytest.raises(RuntimeError, match=r"^bench child 'hf' failed:\ny+KeyError: label\n$") as err:
        train.run_child("hf")
    assert len(str(err.value)) == len("bench child 'hf' failed:\n") + 3000


@pytest.mark.parametrize(("argv", "message"), [
    (["lora", "--model", "m", "--data", "d"], "argument side: invalid choice: 'lora' (choose from 'ours', 'hf', 'quality')"),
    (["ours"], "the following arguments are required: --model, --data"),
    (["ours", "--model", "m", "--data", "d", "--steps", "forty"], "argument --steps: invalid int value: 'forty'"),
    (["quality", "--model", "m", "--data", "d"], "quality needs --valid (the split the best model is chosen and scored on)"),
])
def test_the_entry_point_names_a_bad_argument(monkeypatch, capsys, argv: list[str], message: str) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m lmkernel.bench.train ") and err.rstrip().endswith(f"error: {message}")


def test_the_entry_point_runs_a_side_in_a_scratch_directory_and_prints_json(monkeypatch, capsys) -> None:
    seen = []

    def fake_ours(model, data, steps, batch_size, lora, work):
        seen.append((model, data, steps, batch_size, lora, work, work.is_dir()))
        return SpeedResult("lmkernel", 123.5, 456, steps)

    monkeypatch.setattr(train, "ours", fake_ours)
    monkeypatch.setattr(sys, "argv", ["train.py", "ours", "--model", "m", "--data", "d.jsonl", "--steps", "7", "--lora"])
    train.main()
    (model, data, steps, batch, lora, work, existed), = seen
    assert (model, data, steps, batch, lora, existed) == ("m", Path("d.jsonl"), 7, 16, True, True)
    assert work.name.startswith("lmk-bench-train-") and not work.exists()
    assert json.loads(capsys.readouterr().out) == {"side": "lmkernel", "tokens_per_s": 123.5, "peak_rss_bytes": 456, "steps": 7}
