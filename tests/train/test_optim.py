"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.train.optim import build_optimizer, build_schedule, lr_factor, parameter_groups


def test_norms_and_biases_get_no_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_lowers_a_simple_loss(name):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = build_optimizer(name, model, 0.1, 0.0)
    first = None
    for _ in range(30):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    with pytest.raises(LmkError, match="--optimizer 'lion'"):
        build_optimizer("lion", model, 0.1, 0.0)


def test_schedules_warm_up_linearly_then_follow_their_shape():
    assert [lr_factor("constant", s, 4, 20) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor("constant", 15, 4, 20) == 1.0
    assert lr_factor("linear", 4, 4, 20) == 1.0 and lr_factor("linear", 12, 4, 20) == 0.5
    assert lr_factor("cosine", 12, 4, 20) == pytest.approx(0.5) and lr_factor("cosine", 20, 4, 20) == pytest.approx(0.0)
    assert lr_factor("cosine", 8, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = build_schedule(opt, "linear", 1, 3)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 0.5])
    with pytest.raises(LmkError, match="--schedule 'step'"):
        build_schedule(opt, "step", 0, 3)
