"""Model selection a practitioner can trust: a held-out split of the training data chooses, a test file
is scored once on the chosen model; `lmk tune` searches on the selection split, keeps its study in a file
and resumes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmkernel.errors import LmkError
from lmkernel.train.args import TrainArgs
from lmkernel.train.data import holdout_split
from lmkernel.train.trainer import train
from lmkernel.train.tune import SearchSpace, tune, with_rank
from shared_paths import SHARED_DATA
from test_cli import invoke

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


def _head(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return out


def test_holdout_is_seeded_stratified_and_disjoint():
    labels = [i % 3 for i in range(90)] + [0] * 10  # 40 / 30 / 30
    train_idx, held = holdout_split(len(labels), 0.2, seed=1, labels=labels)
    assert sorted(train_idx + held) == list(range(100)) and not set(train_idx) & set(held)
    assert len(held) == 20 and sorted(labels[i] for i in held).count(0) == 8  # each label in its share
    assert holdout_split(len(labels), 0.2, seed=1, labels=labels) == (train_idx, held)
    assert holdout_split(len(labels), 0.2, seed=2, labels=labels)[1] != held
    unlabelled = holdout_split(10, 0.3, seed=0)
    assert len(unlabelled[1]) == 3 and sorted(unlabelled[0] + unlabelled[1]) == list(range(10))


def test_search_space_and_rank_spec():
    space = SearchSpace.from_mapping({"lr": [1e-4, 1e-3], "batch_size": [8]}, "tune.yaml")
    assert space.lr == (1e-4, 1e-3) and space.batch_size == (8,) and space.epochs == (1, 5)
    with pytest.raises(LmkError, match="search.depth is not searched"):
        SearchSpace.from_mapping({"depth": [1, 2]}, "tune.yaml")
    with pytest.raises(LmkError, match=r"search.lr must be \[low, high\]"):
        SearchSpace.from_mapping({"lr": [1e-3, 1e-4]}, "tune.yaml")
    assert with_rank("r=8,alpha=16", 4) == "r=4,alpha=16" and with_rank("alpha=16", 16) == "r=16,alpha=16"
    assert with_rank("", 2) == "r=2"


@pytest.mark.slow
def test_holdout_chooses_and_the_test_file_is_scored_once_on_the_saved_model(tmp_path):
    data = _head(PHRASEBANK / "train.jsonl", 48, tmp_path / "train.jsonl")
    test = _head(PHRASEBANK / "valid.jsonl", 24, tmp_path / "valid.jsonl")
    args = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(data), holdout=0.25, test_data=str(test),
                     output=str(tmp_path / "run"), epochs=2, batch_size=8, lr=2e-4, warmup=0, eval_every=2,
                     checkpointing=False)
    result = train(args)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "accuracy" in r and r.get("split") != "test"]
    tests = [r for r in records if r.get("split") == "test"]
    assert len(evals) == 5 and len(tests) == 1  # 36 training rows: 5 steps an epoch... evaluated every 2 steps
    assert result.test_metrics == {k: tests[0][k] for k in ("loss", "accuracy", "macro_f1")}
    assert result.best == max(r["accuracy"] for r in evals)
    # The test figure is the saved (best) model's, as a user loads it, not the last step's.
    from lmkernel.engine.llm import LLM

    texts = [json.loads(line) for line in test.read_text().splitlines()]
    got = LLM(str(tmp_path / "run"), verbose=False).classify([t["text"] for t in texts])
    accuracy = sum(g.label == t["label"] for g, t in zip(got, texts)) / len(texts)
    assert abs(accuracy - result.test_metrics["accuracy"]) < 1e-9


@pytest.mark.slow
def test_tune_writes_its_study_resumes_and_trains_the_final_model(tmp_path):
    data = _head(PHRASEBANK / "train.jsonl", 40, tmp_path / "train.jsonl")
    test = _head(PHRASEBANK / "valid.jsonl", 16, tmp_path / "valid.jsonl")
    base = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(data), holdout=0.25, output=str(tmp_path / "tune"),
                     max_steps=2, eval_every=1, warmup=0, checkpointing=False, lora="r=4,alpha=8")
    space = SearchSpace(lr=(1e-4, 1e-3), batch_size=(8,), epochs=(1, 1), warmup=(0.0, 0.0), lora_r=(2, 4))
    first = tune(base, space, trials=3, train_final=False)
    study = tmp_path / "tune" / "study.db"
    assert study.is_file() and len(first.trials) == 3 and (tmp_path / "tune" / "best.json").is_file()
    assert all(t["state"] in ("complete", "pruned") for t in first.trials)
    assert {t["params"]["lora_r"] for t in first.trials} <= {2, 4}
    # Rerun with one more trial: the three finished ones are kept, one new trial runs, then the final model.
    config = tmp_path / "tune.yaml"
    config.write_text(
        f"task: classify\nmodel: all-minilm-l6-v2\ndata: {data}\nholdout: 0.25\ntest_data: {test}\n"
        f"output: {tmp_path / 'tune'}\nmax_steps: 2\neval_every: 1\nwarmup: 0\ncheckpointing: false\nlora: r=4,alpha=8\n"
        "search:\n  lr: [0.0001, 0.001]\n  batch_size: [8]\n  epochs: [1, 1]\n  warmup: [0, 0]\n  lora_r: [2, 4]\n",
        encoding="utf-8")
    out = invoke("tune", str(config), "--trials", "4")
    assert out.returncode == 0, out.stderr
    trials = [json.loads(line) for line in (tmp_path / "tune" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 4 and [t["params"] for t in trials[:3]] == [t["params"] for t in first.trials]
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["params"] == next(t["params"] for t in trials if t["trial"] == best["trial"])
    final = [json.loads(line) for line in (tmp_path / "tune" / "final" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("split") == "test" for r in final) == 1 and "final model on test_data: loss" in out.stdout


@pytest.mark.slow
def test_tune_runs_its_trials_on_ray_tune(tmp_path):
    from lmkernel.train.tune import RayOptions

    data = _head(PHRASEBANK / "train.jsonl", 40, tmp_path / "train.jsonl")
    base = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(data), holdout=0.25, output=str(tmp_path / "tune"),
                     max_steps=2, eval_every=1, warmup=0, checkpointing=False)
    space = SearchSpace(lr=(1e-4, 1e-3), batch_size=(8,), epochs=(1, 1), warmup=(0.0, 0.0))
    result = tune(base, space, trials=2, train_final=False, ray=RayOptions(cpus_per_trial=1))
    assert len(result.trials) == 2 and all(t["state"] == "complete" for t in result.trials)
    assert all(set(t["evaluations"]) == {"1", "2"} for t in result.trials)  # every evaluation reported to Ray
    assert all(1e-4 <= t["params"]["lr"] <= 1e-3 for t in result.trials)
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["value"] == max(t["value"] for t in result.trials) and (tmp_path / "tune" / "ray").is_dir()
