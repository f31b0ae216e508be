"""`lmk bench monitor`'s simulated streams: the CUSUM ahead of the window."""

from __future__ import annotations

from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.bench.monitor import configs, simulated_delays


def test_cusum_flags_bursts_sooner_than_the_window_on_the_same_streams() -> None:
    (cusum, _), (window, _) = [(row, name) for name, c in configs(MonitorConfig())
                               for row in simulated_delays(c, 0.10, [(300, 60, 0.8)], streams=20)]
    assert cusum.detected == window.detected == 1.0
    assert cusum.median <= 12 < 60 <= window.median  # the window needs a window of history first

