"""`lmk train --init-from RUN` on PhraseBank slices: the old task is scored before (equal to the old run's
own test score) and after, replay mixes the old data in, and a strong EWC penalty holds the old weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmkernel.errors import LmkError
from lmkernel.train.args import TrainArgs
from lmkernel.train.trainer import train
from shared_paths import SHARED_DATA

pytestmark = pytest.mark.slow  # training runs

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


def _slice(src: str, start: int, n: int, out: Path) -> Path:
    lines = (PHRASEBANK / src).read_text(encoding="utf-8").splitlines(keepends=True)[start:start + n]
    out.write_text("".join(lines), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("continual")
    args = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(_slice("train.jsonl", 0, 32, d / "a.jsonl")),
                     test_data=str(_slice("valid.jsonl", 0, 40, d / "a_test.jsonl")), output=str(d / "old"), epochs=3,
                     batch_size=8, lr=2e-4, warmup=0, checkpointing=False).check()
    return d, args, train(args)


def _continue(d: Path, name: str, **extra) -> tuple[TrainArgs, object]:
    values = {"task": "classify", "init_from": str(d / "old"), "data": str(_slice("train.jsonl", 32, 24, d / "b.jsonl")),
              "output": str(d / name), "epochs": 2, "batch_size": 8, "lr": 2e-4, "warmup": 0, "checkpointing": False,
              **extra}
    args = TrainArgs.from_mapping(values, "test").check()
    return args, train(args)


def test_plain_continual_run_reports_the_old_task_before_and_after(old_run):
    d, _, old = old_run
    args, result = _continue(d, "plain")
    assert args.model == str(d / "old")  # --init-from sets the model
    assert result.old_task_before == pytest.approx(old.test_metrics, abs=1e-6)  # the same model, scored the same
    assert set(result.old_task_after) == {"loss", "accuracy", "macro_f1"}
    rows = [json.loads(x) for x in (d / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in rows if r.get("split") == "old"] == ["before", "after"]
    assert result.steps == 2 * 3  # 24 new sentences, batches of 8


def test_replay_mixes_in_the_old_data(old_run):
    d, _, _ = old_run
    _, result = _continue(d, "replay", replay=0.5)
    assert result.steps == 2 * 5  # 24 new + 16 replayed


def test_a_strong_ewc_penalty_holds_the_old_task(old_run):
    """At a high learning rate the new data moves the old task's loss; EWC pulls the weights the old task
    depends on back to their old values, so the old loss moves far less."""
    d, _, _ = old_run
    _, held = _continue(d, "ewc", ewc=1e7, lr=2e-3)
    _, free = _continue(d, "free", lr=2e-3)
    drift = {name: abs(r.old_task_after["loss"] - r.old_task_before["loss"]) for name, r in (("ewc", held), ("free", free))}
    assert drift["free"] > 0.1 and drift["ewc"] < 0.5 * drift["free"], drift


def test_continual_settings_are_checked(old_run, tmp_path):
    d, _, _ = old_run
    base = dict(task="classify", data=str(d / "b.jsonl"), output=str(tmp_path / "x"))
    with pytest.raises(LmkError, match="--replay"):
        TrainArgs(**base, model="all-minilm-l6-v2", replay=0.2).check()
    with pytest.raises(LmkError, match="--ewc"):
        TrainArgs(**base, model=str(d / "old"), init_from=str(d / "old"), ewc=1.0, lora="r=4").check()
    with pytest.raises(LmkError, match="--init-from"):
        TrainArgs(**base, model="all-minilm-l6-v2", init_from=str(d / "old")).check()
    with pytest.raises(LmkError, match="not a training run"):
        train(TrainArgs(**base, model=str(tmp_path), init_from=str(tmp_path)).check())
