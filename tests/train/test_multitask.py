"""`lmk train --task multi` on PhraseBank slices: two classification tasks (sentiment, and whether the
sentence quotes a figure) on one MiniLM encoder; each task is evaluated on its own split, its test file
is scored on its saved model, and the run directory holds one loadable model per task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmkernel import LLM
from lmkernel.errors import LmkError
from lmkernel.train.data import DataError
from lmkernel.loading import load_model
from lmkernel.train.args import TrainArgs
from lmkernel.train.trainer import train
from shared_paths import SHARED_DATA

pytestmark = pytest.mark.slow  # a training run

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


def _rows(name: str, start: int, n: int) -> list[dict]:
    lines = (PHRASEBANK / name).read_text(encoding="utf-8").splitlines()[start:start + n]
    return [json.loads(x) for x in lines]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.name


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    figures = lambda rows: [{"text": r["text"], "label": "figure" if re.search(r"\d", r["text"]) else "words"} for r in rows]  # noqa: E731
    spec = {"tasks": [
        {"name": "sentiment", "kind": "classify", "data": _write(d / "s_train.jsonl", _rows("train.jsonl", 0, 40)),
         "eval": _write(d / "s_eval.jsonl", _rows("valid.jsonl", 0, 16)),
         "test": _write(d / "s_test.jsonl", _rows("valid.jsonl", 16, 24)), "weight": 1.0},
        {"name": "figures", "kind": "classify", "data": _write(d / "f_train.jsonl", figures(_rows("train.jsonl", 40, 48))),
         "eval": _write(d / "f_eval.jsonl", figures(_rows("valid.jsonl", 40, 16))), "weight": 0.5},
    ]}
    (d / "tasks.yaml").write_text(json.dumps(spec))  # JSON is YAML
    args = TrainArgs(task="multi", model="all-minilm-l6-v2", data=str(d / "tasks.yaml"), output=str(d / "run"),
                     epochs=4, batch_size=8, lr=3e-4, warmup=0, checkpointing=False).check()
    return d, args, train(args)


def test_each_task_is_evaluated_on_its_own_split_and_the_batches_follow_the_weights(multi_run):
    d, args, result = multi_run
    assert result.steps == 4 * 8  # 40 sentiment + 24 (half of 48) figure examples, batches of 8
    assert {"sentiment/accuracy", "figures/accuracy", "sentiment/macro_f1", "accuracy"} <= set(result.eval_metrics)
    mean = (result.eval_metrics["sentiment/accuracy"] + result.eval_metrics["figures/accuracy"]) / 2
    assert result.eval_metrics["accuracy"] == pytest.approx(mean)
    assert set(result.test_metrics) == {"sentiment/loss", "sentiment/accuracy", "sentiment/macro_f1"}


def test_the_run_directory_holds_one_model_per_task(multi_run):
    d, args, result = multi_run
    model_dir = d / "run" / "model"
    manifest = json.loads((model_dir / "multitask.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["sentiment", "figures"]
    sentiment = LLM(str(model_dir / "sentiment"), verbose=False)
    figures = load_model(model_dir / "figures")
    assert set(sentiment.loaded.config.id2label.values()) == {"negative", "neutral", "positive"}
    assert set(figures.config.id2label.values()) == {"figure", "words"}
    # The encoders are one trained encoder, saved twice.
    a, b = sentiment.loaded.model.state_dict(), figures.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a if k.startswith("bert.encoder."))
    with pytest.raises(LmkError, match="multi-task run holds one model per task"):
        load_model(d / "run")


def test_bad_task_lists_are_refused_with_the_file_and_task(tmp_path):
    bad = tmp_path / "tasks.yaml"
    bad.write_text(json.dumps({"tasks": [{"name": "a", "data": "x.jsonl"}, {"name": "a", "data": "y.jsonl"}]}))
    with pytest.raises(DataError, match="task 2: field 'name'"):
        train(TrainArgs(task="multi", model="all-minilm-l6-v2", data=str(bad), output=str(tmp_path / "r")).check())
    with pytest.raises(LmkError, match="--task"):
        TrainArgs(task="multi", model="m", data=str(bad), output="o", lora="r=4").check()
