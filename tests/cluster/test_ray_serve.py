"""`lmk serve --ray`: a local Ray started on demand, SmolLM2 in 1 to 2 replicas, scaled up by a real load
through the OpenAI client and back down when idle; and joining a Ray cluster that is already running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lmkernel.bench.serve import free_port

pytestmark = pytest.mark.slow  # Ray: `make test` runs it, `make test-fast` does not

MODEL = "smollm2-135m-instruct"
RAY = Path(sys.executable).with_name("ray")


class RayServer:
    """`lmk serve --ray ...` as a child process; its stderr (the replica events) in a file."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "lmkernel.cli", "serve", MODEL, "--ray", *args,
                                             "--kv-cache-memory", "64MiB", "--port", str(self.port)],
                                            stdout=err, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait(self.ready, "the deployment ready", 240)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def replicas(self) -> list[int]:
        """The running-replica counts the driver reported, in order."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.startswith('{"event": "replicas"')]
        return [json.loads(line)["running"] for line in lines]

    def wait(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def targets(path: Path) -> list[str]:
    return json.loads(path.read_text())[0]["targets"] if path.exists() else []


def completions_counted(address: str) -> float:
    """Completions a replica answered with 200, from its own metrics port."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("lmkernel_requests_total{") and 'endpoint="/v1/completions"' in line and 'status="200"' in line)


def test_replicas_follow_the_load(tmp_path: Path) -> None:
    sd_file = tmp_path / "targets.json"
    server = RayServer(tmp_path / "serve.log", "--min-replicas", "1", "--max-replicas", "2",
                       "--target-ongoing-requests", "2", "--upscale-delay", "1", "--downscale-delay", "3",
                       "--metrics-targets", str(sd_file))
    try:
        server.wait(lambda: server.replicas()[-1:] == [1], "one replica reported", 30)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answers: list[tuple[int, str]] = []
        scaled = threading.Event()

        def user(i: int) -> None:
            while not scaled.is_set():
                r = client.completions.create(model=MODEL, prompt=f"Tell story number {i}:", max_tokens=16,
                                              temperature=0, extra_body={"ignore_eos": True})
                answers.append((r.usage.completion_tokens, r.choices[0].text))

        users = [threading.Thread(target=user, args=(i,)) for i in range(8)]
        for t in users:
            t.start()
        try:
            server.wait(lambda: 2 in server.replicas(), "a second replica under load", 180)
            # The load goes on until the new replica has answered too (its own metrics port says so).
            server.wait(lambda: len(targets(sd_file)) == 2 and min(map(completions_counted, targets(sd_file))) > 0,
                        "both replicas answering", 120)
        finally:
            scaled.set()
            for t in users:
                t.join()
        assert len(answers) >= 8 and all(n == 16 and text for n, text in answers), answers
        # Each replica's own metrics port is in the file_sd file, and between them they counted every answer.
        assert all(t.startswith("127.0.0.1:") for t in targets(sd_file))
        server.wait(lambda: sum(map(completions_counted, targets(sd_file))) == len(answers),
                    "every answer counted by the replica that gave it", 10)
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
                                              stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chat)

        counts = server.replicas()
        server.wait(lambda: server.replicas()[len(counts):].count(1) > 0 and server.replicas()[-1] == 1,
                    "back to one replica when idle", 90)
        server.wait(lambda: len(targets(sd_file)) == 1, "the removed replica's metrics address dropped", 30)
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-4000:]
    assert '{"event": "shutdown"}' in server.log.read_text()


TOKEN_AUTH = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray's token authentication, the way its docs set it up


@pytest.fixture
def ray_cluster():
    """A Ray head node started outside lmkernel, as an operator would, with token authentication."""
    port = free_port()
    ray_cli = str(RAY if RAY.exists() else shutil.which("ray"))
    out = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                          "--disable-usage-stats"], capture_output=True, text=True, timeout=180, env=TOKEN_AUTH)
    assert out.returncode == 0, out.stdout + out.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=TOKEN_AUTH)


def test_joins_an_existing_cluster_and_leaves_it_running(ray_cluster: str, tmp_path: Path) -> None:
    server = RayServer(tmp_path / "serve.log", "--ray-address", ray_cluster, env=TOKEN_AUTH)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4 and r.choices[0].text
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-4000:]
    # The cluster outlives `lmk serve`: a new driver still connects to it.
    alive = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{ray_cluster}'); print(ray.cluster_resources()['CPU'])"],
                           capture_output=True, text=True, timeout=120, env=TOKEN_AUTH)
    assert alive.returncode == 0 and alive.stdout.strip().splitlines()[-1] == "2.0", alive.stderr[-2000:]


def test_an_address_where_no_cluster_listens_is_refused_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lmkernel.cli", "serve", MODEL, "--ray", "--ray-address",
                          f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no Ray cluster answers there" in out.stderr
    assert time.monotonic() - start < 60
