"""`lmk bench monitor` on simulated streams: the table and the false-alert line, the CUSUM ahead of the window."""

from __future__ import annotations

from test_cli import invoke

from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.bench.monitor import configs, simulated_delays


def test_cusum_flags_bursts_sooner_than_the_window_on_the_same_streams() -> None:
    (cusum, _), (window, _) = [(row, name) for name, c in configs(MonitorConfig())
                               for row in simulated_delays(c, 0.10, [(300, 60, 0.8)], streams=20)]
    assert cusum.detected == window.detected == 1.0
    assert cusum.median <= 12 < 60 <= window.median  # the window needs a window of history first


def test_bench_monitor_prints_both_detectors() -> None:
    out = invoke("bench", "monitor", "--streams", "5", "--calm-streams", "2", "--calm-records", "2000")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("false alerts per 10,000 calm records") == 2
    assert "cusum (shift 4, threshold 6.5)" in out.stdout and "window (200 / 1000, z 3)" in out.stdout
