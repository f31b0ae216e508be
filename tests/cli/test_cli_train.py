"""`lmk train`, `lmk tune`, `lmk ensemble` and `lmk lora merge` (lmkernel/cli/train.py): flags and YAML settings
reaching TrainArgs, what each command hands to the training library, the summary it prints, and bad values refused
in one line before anything trains or is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_paths import SHARED_DATA
from test_cli import invoke

from lmkernel.errors import LmkError
from lmkernel.train.args import TrainArgs

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


@pytest.fixture
def phrasebank_small(tmp_path) -> tuple[Path, Path]:
    out = []
    for name, n in (("train.jsonl", 32), ("valid.jsonl", 48)):
        lines = (PHRASEBANK / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (tmp_path / name).write_text("".join(lines), encoding="utf-8")
        out.append(tmp_path / name)
    return out[0], out[1]


@pytest.mark.slow  # a training run: `make test` runs it, `make test-fast` does not
def test_a_yaml_config_with_flag_overrides(phrasebank_small, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"task: classify\nmodel: all-minilm-l6-v2\ndata: {phrasebank_small[0]}\nbatch-size: 4\n"
                      f"output: {tmp_path / 'yaml'}\nbf16: true\nschedule: cosine\n")
    out = invoke("train", str(config), "--max-steps", "2")
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "yaml" / "run.json").read_text())
    assert saved["max_steps"] == 2 and saved["bf16"] is True and saved["batch_size"] == 4 and saved["schedule"] == "cosine"
    assert "training finished" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classify\nlearning_rate: 3\n")
    out = invoke("train", str(bad))
    assert out.returncode == 1 and "bad.yaml: unknown setting 'learning_rate'" in out.stderr


def _result(run_dir: Path, **fields):
    from lmkernel.train.trainer import TrainResult

    values = dict(run_dir=run_dir, steps=1234, train_loss=0.51234, eval_metrics={"accuracy": 0.75, "loss": 0.4},
                  best=0.75, best_step=8, seconds=12.34, tokens_per_second=5678.9, trainable_parameters=22_713_216)
    return TrainResult(**{**values, **fields})


def _rows(stdout: str) -> dict[str, str]:
    """The summary table's rows, as {name: value}."""
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in stdout.splitlines() if line.count("│") == 3]
    return dict(rows)


@pytest.fixture
def trains(monkeypatch, tmp_path):
    """`train` replaced: each call's arguments are recorded and the run reports `_result`."""
    calls = []

    def fake(args, resume=False, overwrite=False, console=None, group=None):
        calls.append({"args": args, "resume": resume, "overwrite": overwrite, "group": group})
        return _result(tmp_path / "run")

    monkeypatch.setattr("lmkernel.train.trainer.train", fake)
    return calls


def test_train_flags_reach_train_args_and_the_summary_is_printed(trains, tmp_path):
    out = invoke("train", "--task", "classify", "--model", "m", "--data", "d.jsonl", "--eval", "e.jsonl",
                 "--test", "t.jsonl", "-o", str(tmp_path / "run"), "--lora", "r=4,alpha=8", "--epochs", "2",
                 "--lr", "0.001", "--batch-size", "4", "--grad-accum", "2", "--max-length", "64", "--schedule", "cosine",
                 "--warmup", "0", "--optimizer", "sgd", "--weight-decay", "0", "--clip", "0.5", "--no-bf16",
                 "--no-checkpointing", "--dropout", "0.2", "--early-stop", "3", "--metric", "macro_f1", "--eval-every", "5",
                 "--save-every", "10", "--keep-checkpoints", "1", "--augment", "2", "--adversarial", "fgm",
                 "--adv-epsilon", "0.5", "--seed", "3", "--device", "cpu", "--overwrite")
    assert out.returncode == 0, out.stderr
    (call,) = trains
    assert call["args"] == TrainArgs(
        task="classify", model="m", data="d.jsonl", output=str(tmp_path / "run"), eval_data="e.jsonl", test_data="t.jsonl",
        lora="r=4,alpha=8", epochs=2, lr=0.001, batch_size=4, grad_accum=2, max_length=64, schedule="cosine", warmup=0.0,
        optimizer="sgd", weight_decay=0.0, clip=0.5, bf16=False, checkpointing=False, dropout=0.2, early_stop=3,
        metric="macro_f1", eval_every=5, save_every=10, keep_checkpoints=1, augment=2, adversarial="fgm", adv_epsilon=0.5,
        seed=3, device="cpu")
    assert (call["resume"], call["overwrite"], call["group"].rank, call["group"].world) == (False, True, 0, 1)
    assert str(call["group"].device) == "cpu"
    rows = _rows(out.stdout)
    assert "training finished" in out.stdout
    assert rows == {
        "run directory": str(tmp_path / "run"), "model": str(tmp_path / "run" / "model"), "optimizer steps": "1,234",
        "trainable parameters": "22,713,216", "last training loss": "0.5123", "time": "12.3 s (5,679 tokens/s)",
        "last evaluation": "accuracy 0.7500, loss 0.4000", "best macro_f1": "0.7500 at step 8"}


def test_unset_flags_keep_train_args_defaults(trains, tmp_path):
    out = invoke("train", "--task", "clm", "--model", "m", "--data", "chat.jsonl", "-o", "out", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert trains[0]["args"] == TrainArgs(task="clm", model="m", data="chat.jsonl", output="out", device="cpu")
    assert _rows(out.stdout)["best loss"] == "0.7500 at step 8"  # no --metric: loss for clm
    out = invoke("train", "--task", "classify", "--model", "m", "--data", "d.jsonl", "-o", "out", "--device", "cpu")
    assert _rows(out.stdout)["best accuracy"] == "0.7500 at step 8"  # no --metric: accuracy for classify


def test_a_yaml_config_is_read_and_flags_win(trains, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: classify\nmodel: m\ndata: d.jsonl\neval: e.jsonl\nbatch-size: 4\nlr: 0.01\no: out\n"
                      "device: cpu\n")
    out = invoke("train", str(config), "--lr", "0.002", "--peft", "ia3")
    assert out.returncode == 0, out.stderr
    assert trains[0]["args"] == TrainArgs(task="classify", model="m", data="d.jsonl", output="out", eval_data="e.jsonl",
                                          batch_size=4, lr=0.002, peft="ia3", device="cpu")


def test_resume_takes_the_runs_own_settings_under_the_flags(trains, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainArgs(task="mlm", model="m", data="d.txt", output=str(run), max_steps=4, lr=3e-4, device="cpu")
    (run / "run.json").write_text(json.dumps(saved.to_dict()))
    out = invoke("train", "-o", str(run), "--max-steps", "9", "--resume")
    assert out.returncode == 0, out.stderr
    (call,) = trains
    assert call["resume"] is True and call["overwrite"] is False
    assert call["args"] == TrainArgs(task="mlm", model="m", data="d.txt", output=str(run), max_steps=9, lr=3e-4, device="cpu")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    (["--task", "regress"], "--task 'regress': expected one of clm, mlm, classify, multi"),
    (["--holdout", "0.5"], "--holdout 0.5: expected a fraction from 0 up to (not including) 0.5"),
    (["--eval", "e.jsonl", "--holdout", "0.2"], "--holdout 0.2: expected a selection split from --data or --eval, not both"),
    (["--peft", "ia3", "--lora", "r=4"], "--peft 'ia3': expected unset when --lora is given (--lora SPEC is --peft lora "
                                         "--peft-args SPEC)"),
])
def test_train_refuses_bad_values_before_training(trains, tmp_path, args, message):
    out = invoke("train", "--task", "classify", "--model", "m", "--data", "d.jsonl", *args, "-o", str(tmp_path / "run"),
                 "--device", "cpu")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"error: {message}\n"
    assert trains == [] and not (tmp_path / "run").exists()


def test_missing_settings_and_unreadable_sources_are_named(trains, tmp_path):
    out = invoke("train", "--task", "classify", "-o", str(tmp_path / "run"))
    assert out.returncode == 1 and out.stderr == "error: the command line: missing required setting(s) model, data\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classify\nlearning_rate: 3\n")
    out = invoke("train", str(bad))
    assert out.returncode == 1 and out.stderr.startswith(f"error: {bad}: unknown setting 'learning_rate'; expected some of task, ")
    out = invoke("train", str(tmp_path / "none.yaml"))
    assert out.returncode == 1 and out.stderr == f"error: {tmp_path / 'none.yaml'}: no such config file\n"
    out = invoke("train", "-o", str(tmp_path / "fresh"), "--resume")
    assert out.returncode == 1
    assert out.stderr == (f"error: --resume: {tmp_path / 'fresh'} is not a training run (no run.json); "
                          "start it without --resume\n")
    assert trains == [] and not (tmp_path / "run").exists()


def test_a_training_error_is_one_line(monkeypatch, tmp_path):
    def refuse(args, **kwargs):
        raise LmkError(f"--data {args.data}: the file is empty")

    monkeypatch.setattr("lmkernel.train.trainer.train", refuse)
    out = invoke("train", "--task", "classify", "--model", "m", "--data", "empty.jsonl", "-o", "x", "--device", "cpu")
    assert out.returncode == 1 and out.stdout == "" and out.stderr == "error: --data empty.jsonl: the file is empty\n"


def test_only_the_main_process_prints_and_the_group_is_shut_down(trains, monkeypatch):
    from lmkernel.train.distributed import ProcessGroup

    other = ProcessGroup(rank=1, world=2)
    shut = []
    monkeypatch.setattr("lmkernel.train.distributed.init", lambda device: other)
    monkeypatch.setattr("lmkernel.train.distributed.shutdown", shut.append)
    out = invoke("train", "--task", "clm", "--model", "m", "--data", "d.txt", "-o", "out", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert trains[0]["group"] is other and out.stdout == "" and shut == [other]


@pytest.fixture
def tunes(monkeypatch, tmp_path):
    """`tune` replaced: records its arguments and reports 3 trials, best accuracy 0.8125 with lr 0.0005."""
    from lmkernel.train.tune import TuneResult

    calls = []

    def fake(base, space, trials, console=None, train_final=True, ray=None):
        calls.append({"base": base, "space": space, "trials": trials, "final": train_final, "ray": ray})
        final = _result(tmp_path / "tune" / "final", test_metrics={"accuracy": 0.7, "loss": 0.61}) if train_final else None
        return TuneResult(tmp_path / "tune", "accuracy", [{}, {}, {}], {"lr": 0.0005}, 0.8125, final)

    monkeypatch.setattr("lmkernel.train.tune.tune", fake)
    return calls


def _tune_config(tmp_path, search: str = "search:\n  lr: [0.0001, 0.001]\n  batch_size: [8]\n") -> Path:
    config = tmp_path / "tune.yaml"
    config.write_text(f"task: classify\nmodel: m\ndata: d.jsonl\nholdout: 0.25\noutput: {tmp_path / 'tune'}\n{search}")
    return config


def test_tune_hands_the_settings_and_search_space_over(tunes, tmp_path):
    from lmkernel.train.tune import SearchSpace

    out = invoke("tune", str(_tune_config(tmp_path)), "--trials", "4", "--no-final")
    assert out.returncode == 0, out.stderr
    (call,) = tunes
    assert call["base"] == TrainArgs(task="classify", model="m", data="d.jsonl", holdout=0.25, output=str(tmp_path / "tune"))
    assert call["space"] == SearchSpace(lr=(0.0001, 0.001), batch_size=(8,))
    assert (call["trials"], call["final"], call["ray"]) == (4, False, None)
    assert out.stdout == (f"best accuracy 0.8125 with {{'lr': 0.0005}} (3 trials; {tmp_path / 'tune'}/trials.jsonl, "
                          "best.json)\n")


def test_tune_prints_the_final_model_and_its_test_scores(tunes, tmp_path):
    from lmkernel.train.tune import SearchSpace

    out = invoke("tune", str(_tune_config(tmp_path, "")))
    assert out.returncode == 0, out.stderr
    assert tunes[0]["trials"] == 20 and tunes[0]["final"] is True
    assert tunes[0]["space"] == SearchSpace()
    assert _rows(out.stdout)["best accuracy"] == "0.7500 at step 8"
    assert out.stdout.splitlines()[-1] == "final model on test_data: accuracy 0.7000, loss 0.6100"


@pytest.mark.parametrize("flags, ray", [
    (["--ray"], (None, 1.0)),
    (["--ray", "--cpus-per-trial", "2"], (None, 2.0)),
    (["--ray-address", "auto"], ("auto", 1.0)),
])
def test_tune_on_ray(tunes, tmp_path, flags, ray):
    out = invoke("tune", str(_tune_config(tmp_path)), "--no-final", *flags)
    assert out.returncode == 0, out.stderr
    assert (tunes[0]["ray"].address, tunes[0]["ray"].cpus_per_trial) == ray


def test_tune_refuses_bad_settings_before_searching(tunes, tmp_path):
    config = _tune_config(tmp_path)
    out = invoke("tune", str(config), "--cpus-per-trial", "0")
    assert out.returncode == 1 and out.stderr == "error: --cpus-per-trial must be positive; got 0.0\n"
    listed = _tune_config(tmp_path, "search: [1, 2]\n")
    out = invoke("tune", str(listed))
    assert out.returncode == 1 and out.stderr == f"error: {listed}: search must be a mapping of ranges (lr: [low, high], ...)\n"
    odd = _tune_config(tmp_path, "search:\n  momentum: [0.9]\n")
    out = invoke("tune", str(odd))
    assert out.returncode == 1
    assert out.stderr == f"error: {odd}: search.momentum is not searched; expected some of batch_size, epochs, lora_r, lr, warmup\n"
    assert tunes == []


def test_ensemble_hands_its_members_over(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("lmkernel.train.ensemble.make_ensemble",
                        lambda members, output, overwrite: calls.append((members, output, overwrite)) or output)
    out = invoke("ensemble", "run0", "run1", "run2", "-o", str(tmp_path / "ens"), "--overwrite")
    assert out.returncode == 0, out.stderr
    assert calls == [(["run0", "run1", "run2"], tmp_path / "ens", True)]
    assert out.stdout == (f"ensemble of 3 members: wrote {tmp_path / 'ens'} (LLM, lmk eval classify and lmk serve "
                          "load it)\n")


def test_ensemble_errors_are_one_line(monkeypatch, tmp_path):
    def refuse(members, output, overwrite):
        raise LmkError("an ensemble needs two or more members; got 1")

    monkeypatch.setattr("lmkernel.train.ensemble.make_ensemble", refuse)
    out = invoke("ensemble", "run0", "-o", str(tmp_path / "ens"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: an ensemble needs two or more members; got 1\n"


def test_lora_merge_hands_base_adapter_and_output_over(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("lmkernel.train.lora.merge_adapter_dir",
                        lambda base, adapter, output, overwrite: calls.append((base, adapter, output, overwrite)) or output)
    out = invoke("lora", "merge", "base-model", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    assert calls == [("base-model", tmp_path / "adapter", tmp_path / "merged", False)]
    assert out.stdout == f"merged {tmp_path / 'adapter'} into base-model; wrote {tmp_path / 'merged'}\n"


def test_lora_merge_errors_are_one_line(monkeypatch, tmp_path):
    def refuse(base, adapter, output, overwrite):
        raise ValueError(f"{adapter}: r must be a positive integer")

    monkeypatch.setattr("lmkernel.train.lora.merge_adapter_dir", refuse)
    out = invoke("lora", "merge", "b", "a", "-o", str(tmp_path / "m"))
    assert out.returncode == 1 and out.stdout == "" and out.stderr == "error: a: r must be a positive integer\n"
