"""Where the repository and the shared data sets are, for tests that read them at import time (a plain module:
`conftest` names more than one file under tests/)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
