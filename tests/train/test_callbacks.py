"""Between optimizer steps: the best model kept by its evaluations (higher or lower is better), early stopping
after `patience` evaluations without gain, and checkpoints that skip the step where the run ends anyway."""

from __future__ import annotations

from lmkernel.train.callbacks import BestModel, Checkpoints
from lmkernel.train.checkpoint import Position


def best_model(scores: list[float], higher: bool, patience: int | None) -> tuple[BestModel, Position, list[int], list[tuple]]:
    """A BestModel over these evaluation scores; the run's position, the steps it saved at, what on_eval saw."""
    saved: list[int] = []
    seen: list[tuple] = []
    values = iter(scores)
    position = Position()
    best = BestModel(lambda: {"loss": next(values)}, lambda: saved.append(position.step), "loss", higher, every=10,
                     patience=patience, on_eval=lambda step, s: seen.append((step, s["loss"])))
    return best, position, saved, seen


def run(best: BestModel, position: Position, evaluations: int) -> list[bool]:
    """Evaluate at steps 10, 20, ...; whether each said stop."""
    stops = []
    for i in range(1, evaluations + 1):
        position.step = 10 * i
        stops.append(best(position, None)[1])
    return stops


def test_lower_is_better_saves_on_each_gain_and_stops_after_patience() -> None:
    best, position, saved, seen = best_model([3.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1], higher=False, patience=3)
    stops = run(best, position, 7)
    assert saved == [10, 20, 40]  # 3.0, then 2.0, then 1.0: each better than the best before it
    assert (position.best, position.best_step) == (1.0, 40)
    assert stops == [False] * 6 + [True]  # 1.5, 1.2, 1.1: three evaluations without gain
    assert seen == [(10 * i, v) for i, v in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1], start=1)]


def test_higher_is_better_and_no_patience_never_stops() -> None:
    best, position, saved, _ = best_model([0.5, 0.4, 0.7, 0.7, 0.1, 0.2], higher=True, patience=None)
    assert run(best, position, 6) == [False] * 6
    assert saved == [10, 30] and position.evals_without_gain == 3  # a tie is no gain


def test_evaluations_are_due_every_n_steps_and_at_the_last() -> None:
    best, _, _, _ = best_model([], higher=True, patience=None)
    assert [s for s in range(1, 35) if best.due(s, final=s == 34)] == [10, 20, 30, 34]


def test_checkpoints_every_n_steps_but_not_where_the_run_ends() -> None:
    written: list[int] = []
    checkpoints = Checkpoints(lambda p: written.append(p.step), every=4)
    for step in range(1, 13):
        checkpoints(Position(step=step), ending=step == 12)
    assert written == [4, 8]
