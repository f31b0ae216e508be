"""`lmk bench batch`: `lmk batch` against `lmk serve` driven by 32 concurrent clients, on the same file.

The file is `/v1/completions` requests (prompts cut from the packaged benchmark text, greedy, `ignore_eos`
so both sides generate exactly the same tokens). `lmk batch` runs as a child process and reports the seconds
from its first request to its last result; the server is started first and timed from the clients' first
request to their last answer. Model loading is outside both times.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lmkernel.bench.serve import start_server_process
from lmkernel.bench.workload import Workload
from lmkernel.errors import LmkError


@dataclass
class Side:
    name: str
    seconds: float
    requests: int
    completion_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds


def bodies(work: Workload, model: str) -> list[dict]:
    return [{"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            for prompt, n in zip(work.prompts, work.output_lens)]


def write_batch_file(path: Path, requests: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, body in enumerate(requests):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")


def run_batch(path: Path, out: Path, model: str, engine_args: list[str], requests: int) -> Side:
    proc = subprocess.run([sys.executable, "-m", "lmkernel.cli", "batch", str(path), "-o", str(out), "--model", model,  # nosec B603  # an argument list this module builds, no shell
                           *engine_args], capture_output=True, text=True)
    found = re.search(r"in ([\d.]+) s, ([\d.]+) completion tokens/s", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise LmkError(f"lmk batch failed: {proc.stderr.strip().splitlines()[-3:]}")
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in out.read_text().splitlines())
    return Side("lmk batch", float(found.group(1)), requests, tokens)


def run_serve(requests: list[dict], model: str, engine_args: list[str], clients: int, log: Path) -> Side:
    server = start_server_process([model, *engine_args], log)
    try:
        async def go() -> tuple[float, int]:
            queue: asyncio.Queue[dict] = asyncio.Queue()
            for body in requests:
                queue.put_nowait(body)
            tokens = 0

            async def client(http: httpx.AsyncClient) -> None:
                nonlocal tokens
                while not queue.empty():
                    r = await http.post("/completions", json=queue.get_nowait())
                    if r.status_code != 200:
                        raise LmkError(f"the server answered {r.status_code}: {r.text}")
                    tokens += r.json()["usage"]["completion_tokens"]

            async with httpx.AsyncClient(base_url=server.base_url, timeout=3600,
                                         limits=httpx.Limits(max_connections=clients + 4)) as http:
                start = time.perf_counter()
                await asyncio.gather(*(client(http) for _ in range(clients)))
                return time.perf_counter() - start, tokens

        seconds, tokens = asyncio.run(go())
    finally:
        server.stop()
    return Side(f"lmk serve, {clients} clients", seconds, len(requests), tokens)
