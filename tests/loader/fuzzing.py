"""A seeded fuzz campaign shared by the loader's fuzz tests: make each mutant, run it, and collect every input
that ended in anything but a finished run or a clear `LmkError`."""

from __future__ import annotations

import gc
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lmkernel.errors import LmkError


def campaign(count: int, mutant: Callable[[int], tuple[Path, str]], run: Callable[[Path], None]) -> Counter[str]:
    """Outcomes ("ran", "refused") of `count` mutants; fails listing each one that escaped with another exception."""
    outcomes: Counter[str] = Counter()
    raw = []
    for seed in range(count):
        path, what = mutant(seed)
        try:
            run(path)
            outcomes["ran"] += 1
        except LmkError as exc:
            assert str(exc) and "Traceback" not in str(exc)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - every escape is the failure the campaign reports
            raw.append(f"seed {seed} ({what}): {type(exc).__name__}: {exc}")
        if seed % 16 == 15:  # mutants' models (and their file mappings) go in batches: a full collection costs ~1 s here
            gc.collect()
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not raw, "\n".join(raw)
    return outcomes
