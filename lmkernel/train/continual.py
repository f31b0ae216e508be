"""Continual learning (`lmk train --init-from RUN`): train a finished run's model on new data while
keeping its old task, and measure how much of the old task is forgotten.

    --replay F     mix a seeded fraction F of the old run's training data into the new data
    --ewc LAMBDA   elastic weight consolidation (Kirkpatrick et al. 2017): add
                   LAMBDA / 2 * sum_i F_i (theta_i - theta*_i)^2 to the loss, F the diagonal Fisher
                   information of the old task at the old weights theta* (squared gradients of the
                   log-likelihood of the old training labels, one example at a time, on a seeded sample)

The old task is evaluated on the old run's --test data (or its --eval data) before training and, on
the saved model, after: the forgetting is the difference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.train.checkpoint import read_settings
from lmkernel.train.tasks import Task

FISHER_SAMPLES = 256  # examples whose gradients estimate the Fisher information


@dataclass
class OldTask:
    """The run `--init-from` names: its training data and the split it is measured on."""

    run_dir: Path
    train_items: list[Any]
    eval_items: list[Any]
    eval_source: str

    @staticmethod
    def settings(run_dir: Path, task_name: str) -> dict[str, Any]:
        """The old run's settings, checked to be a run of the same task with data to measure forgetting on."""
        try:
            settings = read_settings(run_dir)
        except LmkError:
            raise LmkError(f"--init-from {run_dir}: not a training run (no run.json); name an `lmk train` run "
                           "directory") from None
        if settings.get("task") != task_name:
            raise LmkError(f"--init-from {run_dir}: that run trained --task {settings.get('task')}; this one is "
                           f"--task {task_name} (continual learning keeps one task)")
        if not (settings.get("test_data") or settings.get("eval_data")):
            raise LmkError(f"--init-from {run_dir}: that run has no --test or --eval data to measure forgetting on")
        return settings

    @classmethod
    def read(cls, run_dir: Path, task_name: str, task: Task) -> OldTask:
        """The old run's data, read with the new run's task (same kind, same labels), or a clear error."""
        settings = cls.settings(run_dir, task_name)
        source = settings.get("test_data") or settings.get("eval_data")
        train_items = task.read(Path(settings["data"]), f"--init-from {run_dir} (its --data)", training=False)
        eval_items = task.read(Path(source), f"--init-from {run_dir} (its --test/--eval)", training=False)
        return cls(run_dir, train_items, eval_items, str(source))

    def replay(self, fraction: float, seed: int) -> list[Any]:
        """A seeded `fraction` of the old training examples, to mix into the new data."""
        if fraction <= 0:
            return []
        count = max(1, round(fraction * len(self.train_items)))
        return random.Random(seed).sample(self.train_items, count)  # nosec B311  # seeded order for data and benchmarks, not a secret


class ElasticWeights:
    """The EWC penalty of the parameters that train, anchored at their values when built."""

    def __init__(self, model: nn.Module, task: Task, items: Sequence[Any], strength: float, seed: int,
                 device: torch.device, samples: int = FISHER_SAMPLES) -> None:
        self.strength = strength
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        chosen = random.Random(seed).sample(range(len(items)), min(samples, len(items)))  # nosec B311  # seeded order for data and benchmarks, not a secret
        was_training = model.training
        model.eval()  # no dropout: the gradients of the model as it is
        for i in chosen:
            batch = task.collate(items, [i], 0, device)
            loss = task.loss_sum(model, batch) / max(batch.num_targets, 1)
            grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
            for (name, _), g in zip(self.params.items(), grads):
                if g is not None:
                    self.fisher[name].add_(g.detach() ** 2)
        for f in self.fisher.values():
            f.div_(max(len(chosen), 1))
        model.train(was_training)

    def penalty(self) -> torch.Tensor:
        total = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self.params.items())
        return 0.5 * self.strength * total  # type: ignore[return-value]
