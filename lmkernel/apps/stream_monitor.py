"""`lmk monitor`: classify a stream of texts and raise one alert when a label's share jumps above its baseline.

Two detectors share one interface (`update`, `shares`, `baseline_share`, `score`, `armed`). The default,
`cusum` (`apps/cusum.py`), accumulates evidence record by record and flags a burst within a few records of
its start. `window` compares the share in the last `window` records with the `baseline` records before it:
how surprising k hits in the n-record window are, given h hits in the m baseline records, is the upper tail
P(K >= k) of the beta-binomial that the baseline predicts, reported as the normal z-score with the same
tail; it alerts at `alert_z` and re-arms below `reset_z`. Either way one burst raises one alert.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

from lmkernel.errors import LmkError

DETECTORS = ("cusum", "window")


@dataclass(frozen=True)
class MonitorConfig:
    """What to watch and how surprised to be before alerting."""

    label: str = "negative"
    window: int = 200  # records in the rolling window (the shares reported; the window detector's test)
    baseline: int = 1000  # records that set the expected share
    alert_z: float = 3.0  # window detector: alert at this z
    reset_z: float = 1.0  # window detector: z must fall below this before the next alert
    min_baseline: int | None = None  # window detector: baseline records needed before alerting; default one window
    detector: str = "cusum"
    shift: float = 4.0  # cusum: the odds ratio of the watched label that a burst is tuned to catch
    threshold: float = 6.5  # cusum: alert when the log-likelihood ratio reaches this
    lag: int = 50  # cusum: records wait this long before they join the baseline
    min_history: int = 100  # cusum: the first records only set the baseline

    def check(self) -> MonitorConfig:
        problems = [
            (self.detector not in DETECTORS, "--detector", f"one of {', '.join(DETECTORS)}"),
            (self.window < 10, "--window", "at least 10 records"),
            (self.detector == "window" and self.baseline < self.window, "--baseline", "at least --window records"),
            (self.baseline < 10, "--baseline", "at least 10 records"),
            (not self.alert_z > 0, "--alert-z", "a positive number"),
            (not self.reset_z < self.alert_z, "--reset-z", "below --alert-z"),
            (not self.shift > 1, "--shift", "an odds ratio above 1"),
            (not self.threshold > 0, "--threshold", "a positive number"),
            (self.lag < 0, "--lag", "0 or more records"),
            (self.min_history < self.lag + 10, "--min-history", "at least --lag + 10 records"),
        ]
        for bad, flag, expected in problems:
            if bad:
                raise LmkError(f"{flag} must be {expected}")
        return self


@dataclass(frozen=True)
class Record:
    index: int  # 0-based position in the stream
    line: int  # 1-based line of the input
    text: str
    time: Any = None  # the record's "time" field, as given


@dataclass(frozen=True)
class Alert:
    alert: str
    label: str
    share: float  # the watched label's share in the rolling window
    baseline: float
    detector: str
    score: float  # the detector's statistic: the CUSUM log-likelihood ratio, or the window's z
    at: Any  # the triggering record's time, or its index when it has none
    index: int
    onset: int  # the index where the detector puts the start of the burst

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Detector(Protocol):
    """What the monitor loop and the gauges read from a detector."""

    config: MonitorConfig
    score: float
    armed: bool
    records: int

    def update(self, label: str, record: Record) -> Alert | None: ...

    def shares(self) -> dict[str, float]: ...

    def baseline_share(self) -> float: ...


class RollingShares:
    """Each label's share among the last `size` records."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.recent: deque[str] = deque()
        self.counts: Counter[str] = Counter()

    def add(self, label: str) -> str | None:
        """Add a label; the one that left the window, if any."""
        self.recent.append(label)
        self.counts[label] += 1
        if len(self.recent) <= self.size:
            return None
        left = self.recent.popleft()
        self.counts[left] -= 1
        return left

    def shares(self) -> dict[str, float]:
        n = len(self.recent)
        return {label: count / n for label, count in self.counts.items()} if n else {}


def read_records(lines: Iterable[str], source: str, skipped: Callable[[int, str], None]) -> Iterator[Record]:
    """JSON lines with "text" (and optionally "time"); a bad line is reported through `skipped`, not fatal."""
    index = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped(number, f"{source}:{number}: not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            skipped(number, f"{source}:{number}: expected an object with a non-empty \"text\" string")
            continue
        yield Record(index, number, obj["text"], obj.get("time"))
        index += 1


def batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def monitor(records: Iterator[Record], classify: Callable[[list[str]], list[str]], detector: Detector,
            out: TextIO, on_alert: Callable[[Alert], None], on_batch: Callable[[int, int], None],
            batch_size: int) -> int:
    """Classify records in batches, feed the detector in stream order, print each alert as one JSON line.

    `on_batch(records in the batch, records so far)` follows each batch. Returns the number of alerts raised."""
    alerts = seen = 0
    for batch in batches(records, batch_size):
        for record, label in zip(batch, classify([r.text for r in batch])):
            alert = detector.update(label, record)
            if alert is not None:
                print(alert.to_json(), file=out, flush=True)
                on_alert(alert)
                alerts += 1
        seen += len(batch)
        on_batch(len(batch), seen)
    return alerts
