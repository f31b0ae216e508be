"""The soak's arithmetic: the traffic mix each client sends and the latency drift it reports."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice

import pytest

from lmkernel.bench.soak import KINDS, Sample, SoakReport, kind_deck


def test_every_deck_sends_the_whole_mix_in_a_seeded_order() -> None:
    weights = {k: w for k, (w, _) in KINDS.items() if w}
    size = sum(weights.values())
    sent = list(islice(kind_deck(random.Random(3)), 4 * size))
    for deck in range(4):
        assert Counter(sent[deck * size:(deck + 1) * size]) == weights
    assert sent == list(islice(kind_deck(random.Random(3)), 4 * size))
    assert sent[:size] != sent[size:2 * size]  # shuffled again for every deck


def _sample(at: float, probe: float) -> Sample:
    return Sample(at, 100.0, 10, 5, cpu_s=at, tokens=10 * at, steal_s=0.0, probe_gflops=probe)


def test_latency_drift_is_scaled_by_how_fast_the_machine_ran_in_each_third() -> None:
    r = SoakReport(90.0)
    r.samples = [_sample(t, 40.0) for t in (0, 10, 20)] + [_sample(t, 30.0) for t in (30, 40, 50, 60)] + \
        [_sample(t, 20.0) for t in (70, 80, 90)]
    r.latencies["chat"] = [(5.0, 1.0), (15.0, 1.2), (25.0, 1.1), (65.0, 2.2), (75.0, 2.0), (85.0, 2.4)]
    raw, scaled = r.latency_drift("chat")
    assert raw == pytest.approx(2.2 / 1.1)  # medians of the last and the first third
    assert scaled == pytest.approx(2.2 / 1.1 * 20.0 / 40.0)  # the machine ran at half speed: no drift of its own
    work = r.work_by_third()
    assert [w.probe_gflops for w in work] == [40.0, 30.0, 20.0]
    assert work[0].tokens_per_s == pytest.approx(10.0) and work[0].cpu_ms_per_token == pytest.approx(100.0)
    assert r.latency_drift("embeddings") is None  # never sent
