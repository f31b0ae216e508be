"""lmkernel.bench.processes: server child processes started until their /health answers 200, and stopped with SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmkernel.bench.processes import HttpProcess, free_port, start_http_process
from lmkernel.errors import LmkError

# A server that answers /health 503 (loading) `ready_after` times, then 200; on SIGTERM it exits with `code`.
# Each request is one log line: "PATH STATUS".
SERVER = """
import http.server, signal, sys
port, ready_after, code = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
asked = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global asked
        asked += self.path == "/health"
        status = 200 if self.path == "/health" and asked > ready_after else 503
        print(self.path, status, flush=True)
        self.send_response(status)
        self.end_headers()
    def log_message(self, *args):
        pass
signal.signal(signal.SIGTERM, lambda *_: sys.exit(code))
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _server(port: int, ready_after: int, code: int) -> list[str]:
    return [sys.executable, "-c", SERVER, str(port), str(ready_after), str(code)]


def _ended(pid: int, within: float = 5.0) -> bool:
    """The process is gone or a zombie (killed, not yet reaped) within `within` s (SIGKILL lands asynchronously)."""
    stat, deadline = Path(f"/proc/{pid}/stat"), time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_waits_through_503_for_200_and_stop_returns_the_exit_code(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    server = start_http_process(_server(port, 1, 3), port, log, "tiny", timeout=30)
    try:
        assert server.url == f"http://127.0.0.1:{port}" and server.base_url == f"http://127.0.0.1:{port}/v1"
        assert server.process.poll() is None
        assert log.read_text().splitlines() == ["/health 503", "/health 200"]
    finally:
        code = server.stop(timeout=10)
    assert code == 3
    assert server.stop() == 3  # already ended: the same code, no second signal


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"
    start = time.monotonic()
    assert HttpProcess(child, "http://127.0.0.1:1", tmp_path / "log").stop(timeout=0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - start < 5
    child.stdout.close()


def test_a_child_that_exits_early_fails_with_its_code_and_the_end_of_its_log(tmp_path: Path) -> None:
    script = "import sys; print('x' * 5000); print('model file is corrupt'); sys.exit(7)"
    with pytest.raises(LmkError, match=r"^crashing exited with 7:\n") as err:
        start_http_process([sys.executable, "-c", script], free_port(), tmp_path / "crash.log", "crashing", timeout=30)
    message = str(err.value)
    assert message.endswith("model file is corrupt\n")
    assert len(message) == len("crashing exited with 7:\n") + 3000  # the log's last 3,000 characters only


def test_a_child_that_never_answers_is_killed_at_the_timeout(tmp_path: Path) -> None:
    log = tmp_path / "silent.log"
    script = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    with pytest.raises(LmkError, match=r"^silent did not answer within 1 s:\npid \d+") as err:
        start_http_process([sys.executable, "-c", script], free_port(), log, "silent", timeout=0.6)
    pid = int(str(err.value).split()[-1])
    assert _ended(pid)

