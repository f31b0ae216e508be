"""The change detectors `lmk monitor` can run, by name."""

from __future__ import annotations

from lmkernel.apps.cusum import CusumDetector
from lmkernel.apps.stream_monitor import Detector, MonitorConfig
from lmkernel.apps.window_detector import WindowDetector


def make_detector(config: MonitorConfig) -> Detector:
    """The detector `config.detector` names (`cusum` or `window`), its settings checked."""
    config.check()
    return WindowDetector(config) if config.detector == "window" else CusumDetector(config)
