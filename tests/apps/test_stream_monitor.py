"""The share detector and the record reader, on synthetic label streams (no model)."""

from __future__ import annotations

import io
import json
import random

import pytest

from lmkernel.apps.monitor_sinks import MonitorMetrics
from lmkernel.apps.stream_monitor import MonitorConfig, Record, ShareDetector, monitor, read_records
from lmkernel.errors import LmkError


def stream(rng: random.Random, rates: list[tuple[int, float]]) -> list[str]:
    """Labels in segments of (length, share of "negative")."""
    return [("negative" if rng.random() < p else rng.choice(["neutral", "positive"])) for n, p in rates for _ in range(n)]


def alerts_of(labels: list[str], config: MonitorConfig) -> list:
    detector = ShareDetector(config)
    found = [detector.update(label, Record(i, i + 1, "x")) for i, label in enumerate(labels)]
    return [a for a in found if a is not None]


def test_a_calm_stream_rarely_alerts() -> None:
    """100,000 records at a steady 12%: at z 3 at most one false alert per 10,000 records; at z 4 none."""
    calm = [stream(random.Random(seed), [(5000, 0.12)]) for seed in range(20)]
    assert sum(len(alerts_of(labels, MonitorConfig(window=200, baseline=1000))) for labels in calm) <= 10
    assert sum(len(alerts_of(labels, MonitorConfig(window=200, baseline=1000, alert_z=4))) for labels in calm) == 0


def test_one_burst_raises_one_alert_inside_the_burst() -> None:
    labels = stream(random.Random(1), [(1500, 0.10), (150, 0.8), (1500, 0.10)])
    alerts = alerts_of(labels, MonitorConfig(window=200, baseline=1000))
    assert len(alerts) == 1
    a = alerts[0]
    assert 1500 <= a.index < 1560 and a.at == a.index  # found early in the burst; no time field: the index
    assert a.label == "negative" and a.alert == "negative_share_jump"
    assert a.z >= 3 and a.share > a.baseline + 0.05 and a.baseline == pytest.approx(0.10, abs=0.03)


def test_the_alert_re_arms_only_after_the_share_falls_back() -> None:
    labels = stream(random.Random(2), [(1200, 0.10), (120, 0.9), (600, 0.10), (120, 0.9), (400, 0.1)])
    alerts = alerts_of(labels, MonitorConfig(window=200, baseline=1000))
    assert [a.index // 100 for a in alerts] == [12, 19]
    # A long plateau at the new level alerts once, then the baseline catches up with it.
    plateau = stream(random.Random(3), [(1200, 0.10), (3000, 0.5)])
    assert len(alerts_of(plateau, MonitorConfig(window=200, baseline=1000))) == 1


def test_no_alert_before_a_window_of_baseline() -> None:
    labels = ["negative"] * 300  # all negative from the start: nothing to compare with yet
    assert alerts_of(labels, MonitorConfig(window=200, baseline=1000)) == []


def test_settings_out_of_range_name_their_flag() -> None:
    for kwargs, flag in [({"window": 5}, "--window"), ({"baseline": 10, "window": 20}, "--baseline"),
                         ({"alert_z": 0}, "--alert-z"), ({"reset_z": 4}, "--reset-z")]:
        with pytest.raises(LmkError, match=flag):
            ShareDetector(MonitorConfig(**kwargs))


def test_records_keep_time_and_bad_lines_are_reported_with_their_line() -> None:
    text = '{"text": "a", "time": "09:00"}\n\nnot json\n{"label": "x"}\n{"text": "b"}\n["text"]\n'
    skipped: list[tuple[int, str]] = []
    records = list(read_records(io.StringIO(text), "feed.jsonl", lambda line, why: skipped.append((line, why))))
    assert [(r.index, r.line, r.text, r.time) for r in records] == [(0, 1, "a", "09:00"), (1, 5, "b", None)]
    assert [line for line, _ in skipped] == [3, 4, 6]
    assert skipped[0][1].startswith("feed.jsonl:3: not JSON") and '"text"' in skipped[1][1]


def test_monitor_prints_alerts_in_stream_order_and_updates_gauges() -> None:
    labels = stream(random.Random(4), [(600, 0.05), (100, 0.9), (100, 0.05)])
    feed = io.StringIO("".join(json.dumps({"text": label, "time": 1000 + i}) + "\n" for i, label in enumerate(labels)))
    detector = ShareDetector(MonitorConfig(window=100, baseline=400))
    metrics = MonitorMetrics(["negative", "neutral", "positive"], "negative")
    out, calls = io.StringIO(), []
    n = monitor(read_records(feed, "feed", lambda *_: None), lambda texts: list(texts), detector, out, metrics.alert,
                lambda new, seen: (calls.append(seen), metrics.observe(new, detector.shares(), detector.baseline_share(),
                                                                        detector.z, detector.armed)), batch_size=64)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == len(lines) == 1 and 1600 <= lines[0]["at"] < 1700  # the record's time, in the burst
    assert calls[-1] == 800 and calls[:2] == [64, 128]
    sample = metrics.registry.get_sample_value
    assert sample("lmkernel_monitor_records_total") == 800
    assert sample("lmkernel_monitor_alerts_total", {"label": "negative"}) == 1
    assert sample("lmkernel_monitor_label_share", {"label": "negative"}) == pytest.approx(detector.shares()["negative"])
