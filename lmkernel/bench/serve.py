"""Serving benchmark: streaming clients over HTTP against a real `lmk serve` process, and the same
load through the in-process `LLM.generate`, to show what the HTTP layer costs, or through llama.cpp's
llama-server, to compare the two servers."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lmkernel.bench.llama_server_peer import build_llama_server, default_cmake_flags, start_llama_server
from lmkernel.bench.processes import HttpProcess, free_port, start_http_process
from lmkernel.bench.workload import Workload
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel


class ServerProcess(HttpProcess):
    """A `lmk serve` child process listening on 127.0.0.1."""

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


def start_server_process(args: list[str], log: Path, timeout: float = 300.0) -> ServerProcess:
    """Run `lmk serve ARGS --port P` and return once /health answers (or fail with its log)."""
    port = free_port()
    started = start_http_process([sys.executable, "-m", "lmkernel.cli", "serve", *args, "--port", str(port)], port, log,
                                 "lmk serve", timeout)
    return ServerProcess(started.process, started.url, started.log)


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
                  ttft: list[float], itl: list[float], ignore_eos: bool) -> int:
    tokens = 0
    while not queue.empty():
        prompt, n = queue.get_nowait()
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": ignore_eos,
                "stream": True}
        if not ignore_eos:  # the answer ends where the model ends it: count what the usage chunk says
            body["stream_options"] = {"include_usage": True}
        start = last = time.perf_counter()
        first = True
        async with http.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                raise LmkError(f"the server answered {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    raise LmkError(f"the stream failed: {line}")
                if not ignore_eos and payload.get("usage"):
                    n = payload["usage"]["completion_tokens"]
                choices = payload.get("choices") or []
                if not choices or (not choices[0].get("text") and choices[0].get("finish_reason") is not None):
                    continue  # a usage or closing chunk (llama-server sends one) carries no token
                now = time.perf_counter()
                (ttft if first else itl).append(now - (start if first else last))
                first, last = False, now
        tokens += n
    return tokens


def run_http(server: HttpProcess, model: str, work: Workload, concurrency: int, ignore_eos: bool = True) -> LoadResult:
    """`concurrency` streaming clients, each sending its next request when the last one ends; each request
    generates its workload length (`ignore_eos`), or up to it, ending where the model ends its answer."""

    async def go() -> LoadResult:
        queue: asyncio.Queue[tuple[list[int], int]] = asyncio.Queue()
        for item in zip(work.prompts, work.output_lens):
            queue.put_nowait(item)
        ttft: list[float] = []
        itl: list[float] = []
        limits = httpx.Limits(max_connections=concurrency + 4)
        # A new connection a request: llama-server drops kept-alive connections between requests.
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits,
                                     headers={"Connection": "close"}) as http:
            start = time.perf_counter()
            counts = await asyncio.gather(*(_client(http, model, queue, ttft, itl, ignore_eos) for _ in range(concurrency)))
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


def engine_counters(server: ServerProcess) -> dict[str, float]:
    """The engine's step counters on /metrics: seconds by phase, steps and tokens by kind."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        if family.name in ("lmkernel_engine_step_seconds", "lmkernel_engine_steps", "lmkernel_engine_tokens"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[f"{family.name}:{next(iter(sample.labels.values()))}"] = sample.value
    return out


@dataclass
class Limits:
    """A decode step of `batch` sequences against this machine's limits, measured in one process."""

    batch: int
    attention_ms: float  # the step's paged attention (every layer) at the run's mean context, measured alone
    floor_ms: float  # weights a decode step reads / read bandwidth
    compute_ms: float  # the step's projection multiply-adds / the int8 peak
    prefill_limit_tps: float  # prompt tokens a second the projections allow at the int8 peak
    bandwidth_gbs: float
    peak_tmacs: float
    units: str


def breakdown(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per phase between two `engine_counters` readings, and the rest of `wall` (HTTP, tokenizing,
    streaming, the event loop, idle)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    phases = {k.split(":", 1)[1]: v for k, v in delta.items() if k.startswith("lmkernel_engine_step_seconds:")}
    phases["HTTP and the rest"] = wall - sum(phases.values())
    return {**phases, **{k: v for k, v in delta.items() if not k.startswith("lmkernel_engine_step_seconds:")}}


def decode_limits(loaded: LoadedModel, batch: int, context: int, repeats: int = 5, block_size: int = 16) -> Limits:
    """Time a decode step's attention for `batch` sequences of `context` tokens (the paged kernel on a cache
    of the model's shape, every layer), and measure the read bandwidth and the int8 peak the step's
    projections are bounded by."""
    import torch

    from lmkernel.bench.latency import decode_bytes, read_bandwidth
    from lmkernel.layers import cpu_kernels
    from lmkernel.layers.linear import GGUFLinear

    model, config = loaded.model, loaded.config
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if isinstance(m, (GGUFLinear, torch.nn.Linear)) and m is not head]
    macs = sum(m.in_features * m.out_features for m in layers)
    per_seq = -(-context // block_size)
    slots = batch * per_seq * block_size
    k = torch.randn(slots, config.num_kv_heads, config.head_dim)
    v = torch.randn(slots, config.num_kv_heads, config.head_dim)
    tables = torch.arange(batch * per_seq, dtype=torch.int64).reshape(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64)
    q = torch.randn(batch, config.num_heads, config.head_dim)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(config.num_layers):
            cpu_kernels.paged_decode(q, k, v, tables, lens, block_size, config.head_dim ** -0.5)
        best = min(best, time.perf_counter() - start)
    bandwidth = read_bandwidth()
    tiles = cpu_kernels.current_path() == "amx"
    peak = cpu_kernels.int8_peak(tiles)
    if not peak:
        raise LmkError("no int8 multiply-add units to measure a compute limit on (no AVX-512 VNNI kernels built)")
    return Limits(batch, best * 1000, decode_bytes(model) / bandwidth * 1000, macs * batch / peak * 1000, peak / macs,
                  bandwidth / 1e9, peak / 1e12, "AMX tiles" if tiles else "AVX-512 VNNI")


def http_and_in_process(server: ServerProcess, loaded: LoadedModel, model: str, kv_cache_memory: str,
                        works: dict[int, Workload], levels: list[int]) -> tuple[dict[int, LoadResult], dict[int, LoadResult]]:
    """Each level through `lmk serve` over HTTP (the server stopped once they ran), then through `LLM.generate`:
    the same requests both ways, so the difference is what HTTP costs."""
    try:
        http = {c: run_http(server, model, works[c], c) for c in levels}
    finally:
        server.stop()
    return http, {c: run_in_process(loaded, kv_cache_memory, works[c], c) for c in levels}


@dataclass
class PeerRun:
    """`lmk bench serve --peer llama-server` measured: both servers at each level of streams, and at the level
    nearest 8 lmk serve's time by phase against the machine's limits."""

    binary: Path
    build: str  # how the llama-server binary came: given, or the cmake flags it was built with
    threads: int
    levels: list[int]
    ours: dict[int, LoadResult]
    theirs: dict[int, LoadResult]
    watched: int  # the level whose time is split
    phases: dict[str, float]  # `breakdown` of lmk serve's engine counters at the watched level
    mean_context: int  # tokens a sequence holds halfway through its answer, on average, at the watched level
    limits: Limits


def run_levels(server: ServerProcess, binary: Path, source: Path, model: str, threads: int, works: dict[int, Workload],
               warm: Workload, logs: Path) -> tuple[dict[int, LoadResult], dict[int, LoadResult], dict[int, dict[str, float]]]:
    """Each level against `lmk serve` (its engine counters read around it), then against a fresh llama-server with
    a slot per stream; both warmed first on prompts of their own, so nothing measured is cached."""
    ours, theirs, phases = {}, {}, {}
    for c in sorted(works):
        run_http(server, model, warm, 2)
        before, start = engine_counters(server), time.perf_counter()
        ours[c] = run_http(server, model, works[c], c)
        phases[c] = breakdown(before, engine_counters(server), time.perf_counter() - start)
        peer = start_llama_server(binary, source, threads, c, free_port(), logs / f"llama-server-{c}.log")
        try:
            run_http(peer, model, warm, 2)
            theirs[c] = run_http(peer, model, works[c], c)
        finally:
            peer.stop()
    return ours, theirs, phases


def against_llama_server(model: str, loaded: LoadedModel, works: dict[int, Workload], kv_cache_memory: str, device: str,
                         peer_binary: Path | None, cmake_args: str | None, output_tokens: int,
                         log: Callable[[str], object]) -> PeerRun:
    """Each level (`works` by streams; 0: the warm-up prompts) against `lmk serve` and against llama-server with the
    same threads, the llama-server built first unless `peer_binary` is given; then the machine's limits for a
    decode step as lmk serve ran them at the level nearest 8."""
    import torch

    threads = torch.get_num_threads()
    if peer_binary is not None and not peer_binary.is_file():
        raise LmkError(f"--peer-binary {peer_binary}: no such file")
    binary = peer_binary or build_llama_server(cmake_args, jobs=threads, log=log)
    build = "given with --peer-binary" if peer_binary else f"built with {cmake_args or default_cmake_flags()}"
    logs = Path(tempfile.mkdtemp(prefix="lmk-bench-serve-"))
    warm = works.pop(0)
    levels = sorted(works)
    watched = min(levels, key=lambda c: abs(c - 8))
    server = start_server_process([model, "--kv-cache-memory", kv_cache_memory, "--device", device, "--threads",
                                   str(threads), "--max-num-seqs", str(max(max(levels), 16))], logs / "lmk.log")
    try:
        ours, theirs, phases = run_levels(server, binary, loaded.source.path, model, threads, works, warm, logs)
    finally:
        server.stop()
    p = phases[watched]
    batch = max(1, round(p["lmkernel_engine_tokens:decode"] / max(p["lmkernel_engine_steps:decode"], 1)))
    mean_context = round(sum(map(len, works[watched].prompts)) / len(works[watched].prompts) + output_tokens / 2)
    return PeerRun(binary, build, threads, levels, ours, theirs, watched, p, mean_context,
                   decode_limits(loaded, batch, mean_context))
