"""What happens between optimizer steps, each piece on its own: evaluation that keeps the best model and stops
early, and checkpoints that let a run resume exactly. The loop calls them; they hold no other state of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmkernel.train.checkpoint import MetricsLog, Position


@dataclass
class BestModel:
    """Evaluate every `every` steps (and at the last): a better `metric` saves the model; `patience` evaluations
    without gain stop the run (None: never). `on_eval(step, scores)` sees each evaluation (a search prunes there)."""

    evaluate: Callable[[], dict[str, float]]
    save: Callable[[], None]
    metric: str
    higher_is_better: bool
    every: int
    patience: int | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)

    def __call__(self, position: Position, log: MetricsLog | None) -> tuple[dict[str, float], bool]:
        """Evaluate now; the scores, and whether the run should stop. `position` keeps the record."""
        scores = self.evaluate()
        if log is not None:
            log.write({"step": position.step, **scores}, "eval")
        if self.on_eval is not None:
            self.on_eval(position.step, scores)
        value = scores[self.metric]
        if self.better(value, position.best):
            position.best, position.best_step, position.evals_without_gain = value, position.step, 0
            self.save()
        else:
            position.evals_without_gain += 1
        return scores, self.patience is not None and position.evals_without_gain >= self.patience


@dataclass
class Checkpoints:
    """A checkpoint every `every` steps, except where the run ends anyway (its model is saved then)."""

    save: Callable[[Position], object]
    every: int

    def __call__(self, position: Position, ending: bool) -> bool:
        """Write one if due; whether it did."""
        if ending or position.step % self.every != 0:
            return False
        self.save(position)
        return True
