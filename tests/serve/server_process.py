"""Start a real `lmk serve` process for a test module (the benchmark's launcher, on a free port)."""

from __future__ import annotations

from pathlib import Path

from lmkernel.bench.serve import ServerProcess as Server
from lmkernel.bench.serve import start_server_process

__all__ = ["Server", "start_server"]


def start_server(log_dir: Path, *args: str) -> Server:
    """`lmk serve ARGS` logging to a file in `log_dir`; returns once /health answers."""
    return start_server_process(list(args), log_dir / "serve.log")
