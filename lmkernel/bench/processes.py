"""Servers a benchmark runs as child processes on 127.0.0.1: started, waited for until their /health
answers 200, stopped with SIGTERM (each drains, then exits)."""

from __future__ import annotations

import signal
import socket
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lmkernel.errors import LmkError


@dataclass
class HttpProcess:
    """A server child process listening on `url`, its output in `log`."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain, then exit; killed after `timeout`); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http_process(args: list[str], port: int, log: Path, name: str, timeout: float = 300.0) -> HttpProcess:
    """Run `args` (a server told to listen on `port`) and return once its /health answers 200 (a loading
    server answers 503); fail with the end of its log if it exits or does not answer in `timeout` s."""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)  # nosec B603  # an argument list this module builds, no shell
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LmkError(f"{name} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return HttpProcess(process, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise LmkError(f"{name} did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
