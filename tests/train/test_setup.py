"""What a run starts from (lmkernel/train/setup.py), the parts that need no model: the optimizer steps it
plans, how an adapter names its base, and the dropout override."""

from __future__ import annotations

import os

from torch import nn

from lmkernel.train.args import TrainArgs
from lmkernel.train.setup import base_name, planned_steps, set_dropout

BASE = dict(task="classify", model="m", data="d", output="o")


def test_planned_steps_count_global_batches_per_epoch() -> None:
    # 2 epochs of ceil(17 / (4 per process * 2 processes * 1)) = 3 steps
    assert planned_steps(TrainArgs(**BASE, epochs=2, batch_size=4), 17, world=2) == 6
    # 2 epochs of ceil(17 / (4 * 1 * 3 micro-batches)) = 2 steps
    assert planned_steps(TrainArgs(**BASE, epochs=2, batch_size=4, grad_accum=3), 17, world=1) == 4
    # LoRA's default 3 epochs of ceil(10 / 16) = 1 step
    assert planned_steps(TrainArgs(**BASE, lora="r=4"), 10, world=1) == 3
    assert planned_steps(TrainArgs(**BASE), 32, world=1) == 10  # full fine-tuning: 5 epochs of 2


def test_max_steps_override_epochs() -> None:
    assert planned_steps(TrainArgs(**BASE, epochs=9, max_steps=7), 1000, world=4) == 7


def test_an_alias_is_kept_and_an_existing_path_made_absolute(tmp_path, monkeypatch) -> None:
    assert base_name("all-minilm-l6-v2") == "all-minilm-l6-v2"
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_name(os.path.join("runs", "a")) == str(run.resolve())
    assert base_name(os.path.join("runs", "missing")) == os.path.join("runs", "missing")


def test_set_dropout_reaches_dropout_modules_and_attention_dropout_p() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dropout_p = 0.1

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Sequential(Attention(), nn.Dropout(0.3)))
    set_dropout(model, 0.0)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.0, 0.0]
    assert model[2][0].dropout_p == 0.0
