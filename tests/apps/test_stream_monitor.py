"""The record reader and the monitor loop, on synthetic label streams (no model)."""

from __future__ import annotations

import io
import json
import random

import pytest

from lmkernel.apps.monitor_sinks import MonitorMetrics
from lmkernel.apps.detectors import make_detector
from lmkernel.apps.stream_monitor import MonitorConfig, monitor, read_records


def stream(rng: random.Random, rates: list[tuple[int, float]]) -> list[str]:
    """Labels in segments of (length, share of "negative")."""
    return [("negative" if rng.random() < p else rng.choice(["neutral", "positive"])) for n, p in rates for _ in range(n)]


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
    detector = make_detector(MonitorConfig(window=100, baseline=400))
    metrics = MonitorMetrics(["negative", "neutral", "positive"], "negative")
    out, calls = io.StringIO(), []
    n = monitor(read_records(feed, "feed", lambda *_: None), lambda texts: list(texts), detector, out, metrics.alert,
                lambda new, seen: (calls.append(seen), metrics.observe(new, detector.shares(), detector.baseline_share(),
                                                                        detector.score, detector.armed)), batch_size=64)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == len(lines) == 1 and 1600 <= lines[0]["at"] < 1620  # the record's time, early in the burst
    assert lines[0]["detector"] == "cusum" and 595 <= lines[0]["onset"] <= 605
    assert calls[-1] == 800 and calls[:2] == [64, 128]
    sample = metrics.registry.get_sample_value
    assert sample("lmkernel_monitor_records_total") == 800
    assert sample("lmkernel_monitor_alerts_total", {"label": "negative"}) == 1
    assert sample("lmkernel_monitor_label_share", {"label": "negative"}) == pytest.approx(detector.shares()["negative"])
    assert sample("lmkernel_monitor_score", {"label": "negative"}) == detector.score
