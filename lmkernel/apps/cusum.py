"""The default change detector of `lmk monitor`: a Bernoulli CUSUM on the watched label against its baseline.

Each record adds its log-likelihood ratio of "a burst" (the watched label's odds multiplied by `shift`)
against "as usual" (the baseline share p0) to a running sum that never drops below zero:

    S_t = max(0, S_{t-1} + log(p1 / p0))            if record t has the watched label
    S_t = max(0, S_{t-1} + log((1 - p1) / (1 - p0)))  otherwise,   p1 = shift * p0 / (1 - p0 + shift * p0)

and the alert fires when S reaches `threshold`. This is Page's test, the quickest detector of a change for
a given rate of false alarms, so a burst is flagged within a few records of its start rather than once it
fills a long window. p0 is learnt from the stream itself: records join the baseline (the last `baseline`
of them) after waiting `lag` records, so a burst's first records do not raise the share they are tested
against; and p0 is taken one posterior standard deviation above the Beta estimate, so a short history
makes the detector cautious rather than jumpy. The first `min_history` records only set the baseline. After an alert it re-arms
once S has fallen back to zero; the last time S left zero is the burst's estimated onset.
"""

from __future__ import annotations

import math
from collections import deque

from lmkernel.apps.stream_monitor import Alert, MonitorConfig, Record, RollingShares


class CusumDetector:
    """Page's CUSUM for a rise in one label's share, with its baseline learnt from the stream."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config.check()
        self.window = RollingShares(config.window)
        self.waiting: deque[bool] = deque()  # the last `lag` records, not yet in the baseline
        self.before: deque[bool] = deque()
        self.hits_before = 0
        self.score = 0.0
        self.onset = 0
        self.armed = True
        self.records = 0

    def shares(self) -> dict[str, float]:
        return self.window.shares()

    def baseline_share(self) -> float:
        """The posterior mean of the baseline share (uniform prior)."""
        return (self.hits_before + 1) / (len(self.before) + 2)

    def reference_share(self) -> float:
        """p0 of the test: the baseline share raised by one posterior standard deviation of its Beta posterior."""
        a, b = self.hits_before + 1.0, len(self.before) - self.hits_before + 1.0
        sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        return min(max(a / (a + b) + sd, 1e-4), 1 - 1e-6)

    def update(self, label: str, record: Record) -> Alert | None:
        """Add one predicted label; an `Alert` when the evidence for a burst reaches the threshold."""
        cfg = self.config
        self.records += 1
        self.window.add(label)
        hit = label == cfg.label
        if self.records <= cfg.min_history:  # the first records only set the baseline
            self._enter_baseline(hit)
            return None
        p0 = self.reference_share()
        p1 = cfg.shift * p0 / (1 - p0 + cfg.shift * p0)
        step = math.log(p1 / p0) if hit else math.log((1 - p1) / (1 - p0))
        if self.score == 0.0:
            self.onset = record.index
        self.score = max(0.0, self.score + step)
        self._enter_baseline(hit)
        if self.armed and self.score >= cfg.threshold:
            self.armed = False
            shares = self.shares()
            return Alert(f"{cfg.label}_share_jump", cfg.label, round(shares.get(cfg.label, 0.0), 4),
                         round(self.baseline_share(), 4), "cusum", round(self.score, 2),
                         record.time if record.time is not None else record.index, record.index, self.onset)
        if not self.armed and self.score == 0.0:
            self.armed = True
        return None

    def _enter_baseline(self, hit: bool) -> None:
        self.waiting.append(hit)
        if len(self.waiting) <= self.config.lag:
            return
        joined = self.waiting.popleft()
        self.before.append(joined)
        self.hits_before += joined
        if len(self.before) > self.config.baseline:
            self.hits_before -= self.before.popleft()
