"""`lmk bench monitor`: how soon the stream monitor's detectors flag a burst, and how often they cry wolf.

Simulated streams: `calm` records with the watched label at the base rate, a burst of L records at a
higher share, then calm again; the delay is the number of burst records up to and including the one that
raised the alert (a burst missed until 100 records after it ended counts as missed). False alerts are
counted on long calm streams that start from nothing, so the first hundred records, when the baseline is
least known, are included. Replayed streams do the same with real sentences and a real classifier's
predictions: each sentence is classified once and streams are drawn from the predictions, which is what
the monitor would see record by record. Seeds here are not the ones the defaults were chosen on.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from lmkernel.apps.detectors import make_detector
from lmkernel.apps.stream_monitor import MonitorConfig, Record
from lmkernel.errors import LmkError

SEED_BASE = 7_000_000  # the defaults were chosen on seeds below 10**6 + 150
MISS = 100  # records after a burst's end past which it counts as missed


@dataclass(frozen=True)
class DelayRow:
    calm: int  # records before the burst
    length: int
    share: float
    median: float | None  # of the detected bursts
    p90: float | None
    detected: float  # fraction of bursts flagged before MISS records past their end
    within_20: float  # fraction flagged within 20 records of the start
    early: float  # fraction of streams with a false alert before the burst


def first_alerts(labels: Sequence[bool], config: MonitorConfig) -> list[int]:
    """Indices where the detector alerts on a stream of watched (True) / other (False) labels."""
    detector = make_detector(config)
    out = []
    for i, hit in enumerate(labels):
        if detector.update(config.label if hit else "other", Record(i, i + 1, "")) is not None:
            out.append(i)
    return out


def burst_delay(labels: Sequence[bool], start: int, length: int, config: MonitorConfig) -> tuple[int | None, bool]:
    """(delay in burst records, or None if missed; whether an alert fired before the burst)."""
    alerts = first_alerts(labels, config)
    early = any(a < start for a in alerts)
    after = [a for a in alerts if start <= a < start + length + MISS]
    return (after[0] - start + 1 if after else None), early


def summarize(calm: int, length: int, share: float, results: list[tuple[int | None, bool]]) -> DelayRow:
    delays = sorted(d for d, _ in results if d is not None)
    n = len(results)
    return DelayRow(calm, length, share, statistics.median(delays) if delays else None,
                    delays[min(len(delays) - 1, int(0.9 * len(delays)))] if delays else None,
                    len(delays) / n, sum(d <= 20 for d in delays) / n, sum(e for _, e in results) / n)


def simulated_delays(config: MonitorConfig, base: float, shapes: Sequence[tuple[int, int, float]],
                     streams: int) -> list[DelayRow]:
    """For each (calm, length, share): `streams` random streams of `calm` records at `base`, a burst of `length`
    records at `share`, and 300 calm records after it."""
    rows = []
    for calm, length, share in shapes:
        results = []
        for s in range(streams):
            rng = random.Random(SEED_BASE + 10 * calm + 1000 * length + int(100 * share) * 7 + s * 100_003)  # nosec B311  # seeded order for data and benchmarks, not a secret
            labels = ([rng.random() < base for _ in range(calm)] + [rng.random() < share for _ in range(length)]
                      + [rng.random() < base for _ in range(300)])
            results.append(burst_delay(labels, calm, length, config))
        rows.append(summarize(calm, length, share, results))
    return rows


def false_alerts_per_10k(config: MonitorConfig, draw: Callable[[random.Random], bool], records: int, streams: int) -> float:
    """Alerts per 10,000 records over `streams` calm streams of `records` labels drawn by `draw`."""
    total = 0
    for s in range(streams):
        rng = random.Random(SEED_BASE + 17 + s)  # nosec B311  # seeded order for data and benchmarks, not a secret
        total += len(first_alerts([draw(rng) for _ in range(records)], config))
    return total / (records * streams) * 1e4


@dataclass(frozen=True)
class Replay:
    """Predicted labels of held-out sentences, split by their true label."""

    watched: list[bool]  # predictions for sentences whose true label is the watched one
    others: list[bool]  # predictions for the rest


def classifier_replay(model: str, rows: Sequence[dict[str, str]], label: str, device: str) -> Replay:
    """Labelled sentences ("text", "label") each classified once by `model`: whether it predicted `label`, for
    the sentences whose true label is `label` and for the others, as the monitor would see them."""
    from lmkernel.engine.llm import LLM

    llm = LLM(model, device=device)
    if not llm.loaded.config.is_classifier:
        raise LmkError(f"--model {model}: not a classifier (train one with `lmk train --task classify`)")
    predicted = [c.label == label for c in llm.classify([r["text"] for r in rows])]
    return Replay([p for p, r in zip(predicted, rows) if r["label"] == label],
                  [p for p, r in zip(predicted, rows) if r["label"] != label])


def replay_delays(replay: Replay, config: MonitorConfig, base: float, length: int, share: float, streams: int,
                  calm: int = 300, tail: int = 200) -> DelayRow:
    """Streams of real predictions: `calm` sentences at true share `base`, a burst of `length` at `share`, a
    calm tail; each record a held-out sentence drawn at random (the set has 84 negatives, fewer than one
    stream of this shape needs, so draws are with replacement)."""
    results = []
    for s in range(streams):
        rng = random.Random(SEED_BASE + 31 + s)  # nosec B311  # seeded order for data and benchmarks, not a secret

        def segment(n: int, p: float) -> list[bool]:
            return [rng.choice(replay.watched) if rng.random() < p else rng.choice(replay.others) for _ in range(n)]

        labels = segment(calm, base) + segment(length, share) + segment(tail, base)
        results.append(burst_delay(labels, calm, length, config))
    return summarize(calm, length, share, results)


def replay_false_alerts(replay: Replay, config: MonitorConfig, base: float, records: int, streams: int) -> float:
    """False alerts per 10,000 records on calm streams of real predictions (sentences drawn with replacement)."""
    return false_alerts_per_10k(
        config, lambda rng: rng.choice(replay.watched) if rng.random() < base else rng.choice(replay.others),
        records, streams)


def configs(config: MonitorConfig) -> list[tuple[str, MonitorConfig]]:
    """The given settings, and the window detector at its defaults for comparison."""
    return [(f"cusum (shift {config.shift:g}, threshold {config.threshold:g})", config),
            ("window (200 / 1000, z 3)", replace(MonitorConfig(label=config.label), detector="window"))]
