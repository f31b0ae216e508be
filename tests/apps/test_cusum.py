"""The CUSUM detector (`lmk monitor`'s default) on synthetic label streams: how soon, how often wrongly."""

from __future__ import annotations

import random
import statistics

import pytest

from lmkernel.apps.cusum import CusumDetector
from lmkernel.apps.stream_monitor import MonitorConfig, Record
from lmkernel.bench.monitor import false_alerts_per_10k, simulated_delays


def stream(rng: random.Random, rates: list[tuple[int, float]]) -> list[str]:
    """Labels in segments of (length, share of "negative")."""
    return [("negative" if rng.random() < p else rng.choice(["neutral", "positive"])) for n, p in rates for _ in range(n)]


def alerts_of(labels: list[str], config: MonitorConfig | None = None) -> list:
    detector = CusumDetector(config or MonitorConfig())
    found = [detector.update(label, Record(i, i + 1, "x")) for i, label in enumerate(labels)]
    return [a for a in found if a is not None]


def test_a_60_record_burst_at_half_is_flagged_within_20_records_of_its_start() -> None:
    """The issue's goal with the defaults: 10% base rate, 300 calm records, 60 at 50%; over 100 streams."""
    (row,) = simulated_delays(MonitorConfig(), 0.10, [(300, 60, 0.5)], streams=100)
    assert row.detected >= 0.97 and row.median <= 20 and row.early <= 0.05, row


def test_calm_streams_raise_at_most_one_false_alert_per_10000_records() -> None:
    """200,000 records at a steady 10% from a cold start: the first hundred records included."""
    assert false_alerts_per_10k(MonitorConfig(), lambda rng: rng.random() < 0.10, 10_000, 20) <= 1.0


def test_one_burst_raises_one_alert_and_names_its_onset() -> None:
    labels = stream(random.Random(1), [(1500, 0.10), (150, 0.8), (1500, 0.10)])
    alerts = [a for a in alerts_of(labels) if a.index >= 1500]  # the calm part's false-alert rate is tested above
    assert len(alerts) == 1
    a = alerts[0]
    assert 1500 <= a.index < 1515 and a.at == a.index  # no time field: the index
    assert abs(a.onset - 1500) <= 5 and a.detector == "cusum" and a.score >= MonitorConfig().threshold
    assert a.label == "negative" and a.alert == "negative_share_jump" and a.baseline == pytest.approx(0.10, abs=0.03)


def test_the_alert_re_arms_once_the_evidence_is_gone() -> None:
    labels = stream(random.Random(2), [(1200, 0.10), (120, 0.9), (600, 0.10), (120, 0.9), (400, 0.1)])
    assert [a.index // 20 for a in alerts_of(labels)] == [60, 96]
    # A lasting move to a new level alerts once; then the baseline learns the new level.
    plateau = stream(random.Random(3), [(1200, 0.10), (4000, 0.5)])
    detector = CusumDetector(MonitorConfig())
    alerts = [a for i, label in enumerate(plateau) if (a := detector.update(label, Record(i, i + 1, "x")))]
    assert len(alerts) == 1 and detector.armed and detector.baseline_share() == pytest.approx(0.5, abs=0.05)


def test_the_first_records_only_set_the_baseline() -> None:
    assert alerts_of(["negative"] * 400) == []  # all negative from the start: that is the baseline
    labels = stream(random.Random(5), [(100, 0.10), (60, 0.9)])
    (alert,) = alerts_of(labels)
    assert 100 <= alert.index < 125  # usable from the hundredth record


def test_a_higher_threshold_alerts_later() -> None:
    delays = {}
    for threshold in (4.0, 9.0):
        rows = simulated_delays(MonitorConfig(threshold=threshold), 0.10, [(300, 60, 0.5)], streams=40)
        delays[threshold] = rows[0].median
    assert delays[4.0] < delays[9.0]
    assert statistics.fmean(delays.values()) > 0
