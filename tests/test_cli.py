"""The `lmk` command line as a whole, and the helpers its commands' tests (tests/cli/) share: `run` starts it the
way a user runs it, in a process of its own (where it streams, reads stdin or writes a model); `invoke` runs it
in this process (the same entry point, without paying for another torch import) where it only answers or refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from typer.testing import CliRunner

from lmkernel.cli import app

LMK = [sys.executable, "-m", "lmkernel.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMK, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})


def invoke(*args: str) -> SimpleNamespace:
    """`lmk ARGS` in this process: its exit code, stdout and stderr, the way `run` gives them."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def test_the_command_line_starts_without_torch() -> None:
    """`import lmkernel` and the CLI module load torch only when a command needs it (`lmk --help` and
    `lmk models` answer in about half a second here, against six with torch)."""
    code = ("import sys, lmkernel, lmkernel.cli; from lmkernel import LmkError; "
            "assert 'torch' not in sys.modules, 'torch was imported'; lmkernel.SamplingParams; "
            "assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
