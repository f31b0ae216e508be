"""The window detector of `lmk monitor`: the watched label's share in the last `window` records against the
`baseline` records before them, as the z-score of a beta-binomial tail. Slower than CUSUM to flag a short
burst (it must fill a good part of the window), but its statistic reads as a plain share comparison."""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist

from lmkernel.apps.stream_monitor import Alert, MonitorConfig, Record, RollingShares


class WindowDetector:
    """The window detector: the rolling share of the watched label against the baseline before the window."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config.check()
        self.window = RollingShares(config.window)
        self.before: deque[bool] = deque()  # watched-or-not of the records that left the window
        self.hits_before = 0
        self.armed = True
        self.score = 0.0
        self.records = 0

    def shares(self) -> dict[str, float]:
        return self.window.shares()

    def baseline_share(self) -> float:
        return (self.hits_before + 1) / (len(self.before) + 2)

    def update(self, label: str, record: Record) -> Alert | None:
        """Add one predicted label; an `Alert` when this record completes a jump."""
        cfg = self.config
        self.records += 1
        left = self.window.add(label)
        if left is not None:
            self.before.append(left == cfg.label)
            self.hits_before += left == cfg.label
            if len(self.before) > cfg.baseline:
                self.hits_before -= self.before.popleft()
        n = len(self.window.recent)
        if n < cfg.window or len(self.before) < (cfg.min_baseline or cfg.window):
            return None
        p, k = self.baseline_share(), self.window.counts[cfg.label]
        self.score = jump_z(k, n, self.hits_before, len(self.before))
        if self.armed and self.score >= cfg.alert_z:
            self.armed = False
            return Alert(f"{cfg.label}_share_jump", cfg.label, round(k / n, 4), round(p, 4), "window",
                         round(self.score, 2), record.time if record.time is not None else record.index, record.index,
                         record.index - n + 1)
        if not self.armed and self.score < cfg.reset_z:
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


