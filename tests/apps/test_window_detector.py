"""The window detector (`lmk monitor --detector window`) on synthetic label streams (no model)."""

from __future__ import annotations

import random

import pytest

from lmkernel.apps.stream_monitor import MonitorConfig, Record
from lmkernel.apps.window_detector import WindowDetector
from lmkernel.errors import LmkError


def stream(rng: random.Random, rates: list[tuple[int, float]]) -> list[str]:
    """Labels in segments of (length, share of "negative")."""
    return [("negative" if rng.random() < p else rng.choice(["neutral", "positive"])) for n, p in rates for _ in range(n)]


def alerts_of(labels: list[str], config: MonitorConfig) -> list:
    detector = WindowDetector(config)
    found = [detector.update(label, Record(i, i + 1, "x")) for i, label in enumerate(labels)]
    return [a for a in found if a is not None]


def test_a_calm_stream_rarely_alerts() -> None:
    """100,000 records at a steady 12%: at z 3 at most one false alert per 10,000 records; at z 4 none."""
    calm = [stream(random.Random(seed), [(5000, 0.12)]) for seed in range(20)]
    assert sum(len(alerts_of(labels, MonitorConfig(detector="window", window=200, baseline=1000))) for labels in calm) <= 10
    assert sum(len(alerts_of(labels, MonitorConfig(detector="window", window=200, baseline=1000, alert_z=4))) for labels in calm) == 0


def test_one_burst_raises_one_alert_inside_the_burst() -> None:
    labels = stream(random.Random(1), [(1500, 0.10), (150, 0.8), (1500, 0.10)])
    alerts = alerts_of(labels, MonitorConfig(detector="window", window=200, baseline=1000))
    assert len(alerts) == 1
    a = alerts[0]
    assert 1500 <= a.index < 1560 and a.at == a.index and a.onset == a.index - 199  # found early in the burst; no time field: the index
    assert a.label == "negative" and a.alert == "negative_share_jump"
    assert a.detector == "window" and a.score >= 3 and a.share > a.baseline + 0.05 and a.baseline == pytest.approx(0.10, abs=0.03)


def test_the_alert_re_arms_only_after_the_share_falls_back() -> None:
    labels = stream(random.Random(2), [(1200, 0.10), (120, 0.9), (600, 0.10), (120, 0.9), (400, 0.1)])
    alerts = alerts_of(labels, MonitorConfig(detector="window", window=200, baseline=1000))
    assert [a.index // 100 for a in alerts] == [12, 19]
    # A long plateau at the new level alerts once, then the baseline catches up with it.
    plateau = stream(random.Random(3), [(1200, 0.10), (3000, 0.5)])
    assert len(alerts_of(plateau, MonitorConfig(detector="window", window=200, baseline=1000))) == 1


def test_no_alert_before_a_window_of_baseline() -> None:
    labels = ["negative"] * 300  # all negative from the start: nothing to compare with yet
    assert alerts_of(labels, MonitorConfig(detector="window", window=200, baseline=1000)) == []


def test_settings_out_of_range_name_their_flag() -> None:
    for kwargs, flag in [({"window": 5}, "--window"), ({"baseline": 10, "window": 20}, "--baseline"),
                         ({"alert_z": 0}, "--alert-z"), ({"reset_z": 4}, "--reset-z")]:
        with pytest.raises(LmkError, match=flag):
            WindowDetector(MonitorConfig(detector="window", **kwargs))
