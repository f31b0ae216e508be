"""Optimizers and learning-rate schedules.

AdamW, SGD with momentum and Adafactor, all PyTorch's own. Biases and normalisation weights (every
one-dimensional parameter) get no weight decay. Every schedule starts with a linear warm-up from
zero and then stays constant, falls linearly to zero, or follows a half cosine to zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmkernel.errors import LmkError

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Trainable parameters in two groups: matrices decay, biases and norm weights do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer called `name` over the model's trainable parameters."""
    groups = parameter_groups(model, weight_decay)
    if not any(group["params"] for group in groups):
        raise LmkError("the model has no trainable parameters")
    # The fused kernels update every parameter in one pass (on CPU too): a fifth of the step's time.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=fused)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise LmkError(f"--optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The multiple of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepping once per optimizer step."""
    if schedule not in SCHEDULES:
        raise LmkError(f"--schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, warmup, total))
