"""`lmk monitor`: classify a stream of texts and raise one alert when a label's share jumps above its baseline.

The rolling window holds the last `window` predicted labels; the baseline is the share of the watched label in
the `baseline` records just before the window. How surprising k hits in the n-record window are, given h hits
in the m baseline records, is the upper tail P(K >= k) of the beta-binomial that the baseline predicts (the
rate's uncertainty from m records and the skew of a small share both included), reported as the normal
z-score with the same tail. An alert fires when z reaches
`alert_z` and re-arms only once z falls back below `reset_z`, so one burst raises one alert.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from lmkernel.errors import LmkError


@dataclass(frozen=True)
class MonitorConfig:
    """What to watch and how surprised to be before alerting."""

    label: str = "negative"
    window: int = 200  # records in the rolling window
    baseline: int = 1000  # records before the window that set the expected share
    alert_z: float = 3.0
    reset_z: float = 1.0  # z must fall below this before the next alert
    min_baseline: int | None = None  # records of baseline needed before alerting; default: one window

    def check(self) -> MonitorConfig:
        problems = [
            (self.window < 10, "--window", "at least 10 records"),
            (self.baseline < self.window, "--baseline", "at least --window records"),
            (not self.alert_z > 0, "--alert-z", "a positive number"),
            (not self.reset_z < self.alert_z, "--reset-z", "below --alert-z"),
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
    share: float
    baseline: float
    z: float
    at: Any  # the triggering record's time, or its index when it has none
    index: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class ShareDetector:
    """Rolling label shares and the jump test for one watched label."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config.check()
        self.recent: deque[str] = deque()
        self.before: deque[bool] = deque()  # watched-or-not of the records that left the window
        self.counts: Counter[str] = Counter()
        self.hits_before = 0
        self.armed = True
        self.z = 0.0
        self.records = 0

    def shares(self) -> dict[str, float]:
        n = len(self.recent)
        return {label: count / n for label, count in self.counts.items()} if n else {}

    def baseline_share(self) -> float:
        return (self.hits_before + 1) / (len(self.before) + 2)

    def update(self, label: str, record: Record) -> Alert | None:
        """Add one predicted label; an `Alert` when this record completes a jump."""
        cfg = self.config
        self.records += 1
        self.recent.append(label)
        self.counts[label] += 1
        if len(self.recent) > cfg.window:
            left = self.recent.popleft()
            self.counts[left] -= 1
            self.before.append(left == cfg.label)
            self.hits_before += left == cfg.label
            if len(self.before) > cfg.baseline:
                self.hits_before -= self.before.popleft()
        if len(self.recent) < cfg.window or len(self.before) < (cfg.min_baseline or cfg.window):
            return None
        p, n, k = self.baseline_share(), len(self.recent), self.counts[cfg.label]
        self.z = jump_z(k, n, self.hits_before, len(self.before))
        if self.armed and self.z >= cfg.alert_z:
            self.armed = False
            return Alert(f"{cfg.label}_share_jump", cfg.label, round(k / n, 4), round(p, 4), round(self.z, 2),
                         record.time if record.time is not None else record.index, record.index)
        if not self.armed and self.z < cfg.reset_z:
            self.armed = True
        return None


def jump_z(k: int, n: int, h: int, m: int) -> float:
    """z-score of the tail P(K >= k), K ~ BetaBinomial(n, h + 1, m - h + 1): k of n given h of m before.

    Below the expected count the tail is at least about one half and z at most about zero; there the normal
    approximation serves (only the re-arming test reads it), which spares summing over the whole mode."""
    a, b = h + 1.0, m - h + 1.0
    p = a / (a + b)
    if k <= n * p:
        return (k / n - p) / math.sqrt(p * (1 - p) * (1 / n + 1 / m))
    log_first = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + math.lgamma(k + a)
                 + math.lgamma(n - k + b) - math.lgamma(n + a + b) - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))
    total = term = 1.0  # terms relative to P(K = k); past the mode each is smaller than the one before
    for j in range(k, n):
        term *= (n - j) / (j + 1) * (j + a) / (n - j - 1 + b)
        total += term
        if term < 1e-12 * total:
            break
    tail = math.exp(log_first) * total
    return -NormalDist().inv_cdf(min(max(tail, 1e-300), 1 - 1e-12))


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


def monitor(records: Iterator[Record], classify: Callable[[list[str]], list[str]], detector: ShareDetector,
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
