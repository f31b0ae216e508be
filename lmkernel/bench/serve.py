"""Serving benchmark: streaming clients over HTTP against a real `lmk serve` process, and the same
load through the in-process `LLM.generate`, to show what the HTTP layer costs."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from lmkernel.bench.workload import Workload
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel


@dataclass
class ServerProcess:
    """A `lmk serve` child process listening on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain, then exit); returns the exit code."""
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


def start_server_process(args: list[str], log: Path, timeout: float = 300.0) -> ServerProcess:
    """Run `lmk serve ARGS --port P` and return once /health answers (or fail with its log)."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "lmkernel.cli", "serve", *args, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LmkError(f"lmk serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return ServerProcess(process, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise LmkError(f"lmk serve did not answer within {timeout:.0f} s:\n{log.read_text()}")


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    output_tokens: int
    ttft: list[float]
    itl: list[float]

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    def percentile(self, which: str, q: float) -> float:
        values = getattr(self, which)
        return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def _client(http: httpx.AsyncClient, model: str, queue: asyncio.Queue[tuple[list[int], int]],
                  ttft: list[float], itl: list[float]) -> int:
    tokens = 0
    while not queue.empty():
        prompt, n = queue.get_nowait()
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        start = last = time.perf_counter()
        first = True
        async with http.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                raise LmkError(f"the server answered {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if "error" in json.loads(line[6:]):
                    raise LmkError(f"the stream failed: {line}")
                now = time.perf_counter()
                (ttft if first else itl).append(now - (start if first else last))
                first, last = False, now
        tokens += n
    return tokens


def run_http(server: ServerProcess, model: str, work: Workload, concurrency: int) -> LoadResult:
    """`concurrency` streaming clients, each sending its next request when the last one ends."""

    async def go() -> LoadResult:
        queue: asyncio.Queue[tuple[list[int], int]] = asyncio.Queue()
        for item in zip(work.prompts, work.output_lens):
            queue.put_nowait(item)
        ttft: list[float] = []
        itl: list[float] = []
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as http:
            start = time.perf_counter()
            counts = await asyncio.gather(*(_client(http, model, queue, ttft, itl) for _ in range(concurrency)))
            seconds = time.perf_counter() - start
        return LoadResult(concurrency, seconds, len(work.prompts), sum(counts), ttft, itl)

    return asyncio.run(go())


def run_in_process(loaded: LoadedModel, kv_cache_memory: str, work: Workload, concurrency: int) -> LoadResult:
    """The same requests through `LLM.generate`, at most `concurrency` running at once."""
    llm = LLM(loaded, kv_cache_memory=kv_cache_memory, max_num_seqs=concurrency, verbose=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return LoadResult(concurrency, seconds, len(outs), sum(len(o.outputs[0].token_ids) for o in outs), [], [])
