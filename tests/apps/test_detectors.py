"""`make_detector` (lmkernel/apps/detectors.py): the detector `--detector` names, its settings checked first."""

from __future__ import annotations

import pytest

from lmkernel.apps.cusum import CusumDetector
from lmkernel.apps.detectors import make_detector
from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.apps.window_detector import WindowDetector
from lmkernel.errors import LmkError


def test_the_default_detector_is_cusum() -> None:
    assert isinstance(make_detector(MonitorConfig()), CusumDetector)


def test_the_window_detector_by_name_keeps_its_config() -> None:
    config = MonitorConfig(detector="window", window=50, baseline=100, label="positive")
    detector = make_detector(config)
    assert type(detector) is WindowDetector and detector.config == config
    assert (detector.records, detector.armed) == (0, True)


def test_settings_out_of_range_name_their_flag() -> None:
    for kwargs, flag in [({"detector": "ewma"}, "--detector"), ({"shift": 1.0}, "--shift"), ({"threshold": 0}, "--threshold"),
                         ({"lag": -1}, "--lag"), ({"min_history": 20}, "--min-history"), ({"baseline": 5}, "--baseline")]:
        with pytest.raises(LmkError, match=flag):
            make_detector(MonitorConfig(**kwargs))


def test_an_unknown_detector_is_refused_with_the_names_it_takes() -> None:
    with pytest.raises(LmkError, match="^--detector must be one of cusum, window$"):
        make_detector(MonitorConfig(detector="ewma"))
    with pytest.raises(LmkError, match="^--baseline must be at least --window records$"):
        make_detector(MonitorConfig(detector="window", window=200, baseline=100))
