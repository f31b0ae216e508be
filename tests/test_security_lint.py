"""The static security lint (bandit) over the package: no finding that is not waived in place, and every
waiver names its check and says why."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmkernel"


def test_bandit_reports_nothing() -> None:
    out = subprocess.run([sys.executable, "-m", "bandit", "-q", "-r", str(PACKAGE), "-f", "json"], capture_output=True,
                         text=True, timeout=300)
    report = json.loads(out.stdout)
    found = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert not found, "\n".join(found)
    assert not report["errors"], report["errors"]


def test_every_waiver_names_its_check_and_a_reason() -> None:
    bare = []
    for path in PACKAGE.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "nosec" in line and not re.search(r"# nosec B\d+( B\d+)*  # \S.{8,}", line):
                bare.append(f"{path}:{n}: {line.strip()}")
    assert not bare, "\n".join(bare)
