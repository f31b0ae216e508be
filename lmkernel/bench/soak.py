"""Soak: `lmk serve` under a set time of mixed traffic from concurrent clients (chat, completions, streams,
tools, JSON schema, embeddings, streams cut off mid-way, prompts over the context, malformed bodies, wrong keys,
adapters loaded and unloaded at run time), then SIGTERM. What it reports: requests and statuses of each kind
(no 5xx; every other non-2xx the 4xx the kind expects), the server's resident memory, file descriptors and
threads over time, latency percentiles per kind in each third of the run, and the KV blocks at the end."""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from lmkernel.bench.serve import ServerProcess, start_server_process

KEY = "sk-soak"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
# kind -> (weight in the mix, the statuses it expects)
KINDS = {
    "chat": (3, {200}), "completion": (2, {200}), "stream": (3, {200}), "tools": (1, {200}), "json_schema": (1, {200}),
    "embeddings": (2, {200}), "cut_stream": (1, {200}), "over_context": (1, {400}), "malformed": (1, {400}),
    "wrong_key": (1, {401}), "adapter": (0, {200}),  # adapters: one client of its own, load, use, unload
}


@dataclass
class Sample:
    at: float  # seconds since the start
    rss_mib: float
    fds: int
    threads: int
    cpu_s: float = 0.0  # the server's user + system CPU seconds so far
    tokens: float = 0.0  # tokens it has generated so far (its lmkernel_generation_tokens counter)
    steal_s: float = 0.0  # CPU seconds the host's hypervisor has taken from this machine so far (/proc/stat)
    probe_gflops: float = 0.0  # a fixed one-thread matrix product timed now: what the host gives a core under this load


@dataclass(frozen=True)
class ThirdWork:
    """What the server and the host did in one third of the run."""

    tokens_per_s: float  # tokens generated a second
    cpu_ms_per_token: float  # server CPU milliseconds a generated token
    steal: float  # share of the machine's CPU time the hypervisor took
    probe_gflops: float  # median speed of the probe: the machine's speed for the same work


@dataclass
class SoakReport:
    seconds: float
    counts: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    latencies: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)  # transport failures and unexpected statuses
    samples: list[Sample] = field(default_factory=list)
    kv_free: float = 0.0
    kv_total: float = 0.0
    exit_code: int | None = None

    @property
    def server_errors(self) -> int:
        return sum(n for by in self.counts.values() for status, n in by.items() if status >= 500)

    def unexpected(self) -> dict[str, dict[int, int]]:
        return {kind: {s: n for s, n in by.items() if s not in KINDS[kind][1]} for kind, by in self.counts.items()
                if any(s not in KINDS[kind][1] for s in by)}

    def warm(self, warmup: float = 0.2) -> Sample:
        """The first sample after warm-up (thread pools, compiled grammars and caches filled)."""
        return next((s for s in self.samples if s.at >= warmup * self.seconds), self.samples[-1])

    def drift(self, warmup: float = 0.2) -> float:
        """Resident memory at the end against just after warm-up (a fraction: 0.05 = 5% more)."""
        return self.samples[-1].rss_mib / self.warm(warmup).rss_mib - 1

    def work_by_third(self) -> list[ThirdWork]:
        """Each third's work and the machine's speed. Rising latency with a steady CPU cost a token is the host
        giving the server less time; a rising cost with a steady probe is the server doing more for the same work;
        a rising cost with a slower probe is the host's cores running slower (neighbours, memory bandwidth)."""
        out = []
        for third in range(3):
            inside = [s for s in self.samples if third * self.seconds / 3 <= s.at <= (third + 1) * self.seconds / 3]
            if len(inside) < 2:
                out.append(ThirdWork(0.0, 0.0, 0.0, 0.0))
                continue
            a, b = inside[0], inside[-1]
            tokens, elapsed = b.tokens - a.tokens, b.at - a.at
            out.append(ThirdWork(tokens / elapsed, 1000 * (b.cpu_s - a.cpu_s) / max(tokens, 1.0),
                                 (b.steal_s - a.steal_s) / (elapsed * (os.cpu_count() or 1)),
                                 statistics.median(s.probe_gflops for s in inside)))
        return out

    def latency_drift(self, kind: str) -> tuple[float, float] | None:
        """A kind's p50 latency in the last third over the first: as measured, and at the first third's machine
        speed (scaled by the probe), which is the server's own drift."""
        first, last = self.percentiles(kind, 0), self.percentiles(kind, 2)
        work = self.work_by_third()
        if first is None or last is None or not work[0].probe_gflops or not work[2].probe_gflops:
            return None
        raw = last[0] / first[0]
        return raw, raw * work[2].probe_gflops / work[0].probe_gflops

    def percentiles(self, kind: str, third: int) -> tuple[float, float] | None:
        """p50 and p99 latency (s) of a kind's requests that started in one third of the run."""
        lo, hi = third * self.seconds / 3, (third + 1) * self.seconds / 3
        xs = sorted(s for at, s in self.latencies[kind] if lo <= at < hi)
        if not xs:
            return None
        return statistics.median(xs), xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def _proc(pid: int) -> tuple[float, int, int, float]:
    """Resident MiB, open descriptors, threads and user + system CPU seconds of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / ticks  # utime and stime, fields 14 and 15 of stat(5)
    return int(fields["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]), cpu


def _steal_seconds() -> float:
    """CPU seconds stolen from this machine by its hypervisor since boot (the `steal` column of /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def _probe_gflops(size: int = 384, rounds: int = 3) -> float:
    """GFLOP/s of one thread multiplying two fixed float32 matrices, the best of a few rounds (a few ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.ones(size, size)
        best = float("inf")
        for _ in range(rounds):
            began = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best / 1e9


def write_random_adapter(directory: Path, model: str, seed: int) -> Path:
    """A small LoRA (rank 4 on q_proj and v_proj) of random weights for `model`, in the PEFT format."""
    from lmkernel.layers.lora import init_lora_a
    from lmkernel.loader.adapter import AdapterConfig, LoraAdapter, write_adapter
    from lmkernel.loading import load_model

    c = load_model(model).config
    g = torch.Generator().manual_seed(seed)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    lora = {}
    for i in range(c.num_layers):
        for name, out in (("self_attn.q_proj", q), ("self_attn.v_proj", kv)):
            lora[f"model.layers.{i}.{name}"] = (init_lora_a(4, c.hidden_size, g), torch.randn(out, 4, generator=g) * 0.05)
    config = AdapterConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"), task_type="CAUSAL_LM",
                           base_model_name_or_path=model)
    return write_adapter(directory, LoraAdapter(config, lora, {}, "LlamaForCausalLM"))


def kind_deck(rng: random.Random) -> Iterator[str]:
    """Kinds from shuffled decks of the whole mix, one deck after another: every stretch of the run sends the same
    mix, so the thirds whose latencies are compared did the same work."""
    while True:
        deck = [k for k, (w, _) in KINDS.items() for _ in range(w)]
        rng.shuffle(deck)
        yield from deck


class _Client:
    def __init__(self, server: ServerProcess, model: str, embed: str, context: int, report: SoakReport, start: float,
                 lock: threading.Lock, seed: int) -> None:
        self.server, self.model, self.embed, self.context = server, model, embed, context
        self.report, self.start, self.lock = report, start, lock
        self.rng = random.Random(seed)  # nosec B311  # a seeded traffic mix, not a secret
        self.kinds = kind_deck(self.rng)
        self.http = httpx.Client(base_url=server.base_url, timeout=600, headers={"Authorization": f"Bearer {KEY}"})

    def record(self, kind: str, status: int, began: float, note: str = "") -> None:
        with self.lock:
            self.report.counts[kind][status] += 1
            self.report.latencies[kind].append((began - self.start, time.monotonic() - began))
            if status not in KINDS[kind][1]:
                self.report.errors.append(f"{kind}: {status} {note[:200]}")

    def one(self, kind: str) -> None:
        began = time.monotonic()
        user = f"In one sentence, what is {self.rng.choice(['rain', 'a river', 'bread', 'a compiler', 'jazz'])}?"
        chat = {"model": self.model, "messages": [{"role": "user", "content": user}], "max_tokens": 16}
        if kind == "chat":
            r = self.http.post("/chat/completions", json={**chat, "temperature": 0.7})
        elif kind == "completion":
            r = self.http.post("/completions", json={"model": self.model, "prompt": f"{user}\nAnswer:", "max_tokens": 16})
        elif kind == "tools":
            r = self.http.post("/chat/completions", json={
                **chat, "messages": [{"role": "user", "content": "What is the weather in Oslo?"}], "tools": TOOLS})
        elif kind == "json_schema":
            r = self.http.post("/chat/completions", json={
                **chat, "messages": [{"role": "user", "content": "Invent a person."}], "max_tokens": 32,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}})
            if r.status_code == 200:  # a truncated object is allowed at the token limit; a wrong type is not
                text = r.json()["choices"][0]["message"]["content"]
                if r.json()["choices"][0]["finish_reason"] == "stop":
                    json.loads(text)
        elif kind == "embeddings":
            r = self.http.post("/embeddings", json={"model": self.embed, "input": [user, "a second text"]})
        elif kind in ("stream", "cut_stream"):
            status = 0
            with self.http.stream("POST", "/chat/completions", json={**chat, "stream": True, "max_tokens": 24}) as r:
                status = r.status_code
                for n, line in enumerate(r.iter_lines()):
                    if '"error"' in line:  # a failure after the 200 went out arrives as an error event
                        status = 500 if '"server_error"' in line else 400
                    if kind == "cut_stream" and n >= 3:
                        break  # the client goes away mid-stream
            return self.record(kind, status, began)
        elif kind == "over_context":
            r = self.http.post("/completions", json={"model": self.model, "prompt": [5] * (self.context + 10), "max_tokens": 4})
        elif kind == "malformed":
            r = self.http.post("/chat/completions", content=self.rng.choice(
                [b"{not json", b'{"model": 3}', b'{"messages": "x"}', b"[]", b'{"model": "m", "messages": [{"role": 7}]}']),
                headers={"Content-Type": "application/json"})
        elif kind == "wrong_key":
            r = self.http.post("/completions", json={"model": self.model, "prompt": "x"}, headers={"Authorization": "Bearer nope"})
        else:
            raise ValueError(kind)
        self.record(kind, r.status_code, began, r.text)

    def adapter_round(self, directory: Path, i: int) -> None:
        name = f"a{i % 3}"
        began = time.monotonic()
        r = self.http.post(f"{self.server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(directory)})
        self.record("adapter", r.status_code, began, r.text)
        if r.status_code == 200:
            began = time.monotonic()
            r = self.http.post("/completions", json={"model": f"{self.model}:{name}", "prompt": "Hello", "max_tokens": 8})
            self.record("adapter", r.status_code, began, r.text)
            began = time.monotonic()
            r = self.http.post(f"{self.server.url}/v1/unload_lora_adapter", json={"lora_name": name})
            self.record("adapter", r.status_code, began, r.text)


def soak(model: str, embed: str, seconds: float, clients: int, log_dir: Path, kv_cache_memory: str = "1GiB",
         seed: int = 0) -> SoakReport:
    """Run the mix for `seconds` against a fresh server, then stop it with SIGTERM."""
    adapters = log_dir / "adapters"
    adapter = write_random_adapter(adapters / "one", model, seed)
    server = start_server_process([model, "--embedding-model", embed, "--api-key", KEY, "--kv-cache-memory", kv_cache_memory,
                                   "--allow-runtime-lora", "--lora-modules-dir", str(adapters), "--max-loras", "2",
                                   "--tool-call-parser", "hermes"],  # tools offered even where a template renders none
                                  log_dir / "serve.log")
    report = SoakReport(seconds)
    lock = threading.Lock()
    try:
        info = httpx.get(f"{server.url}/tokenizer_info", timeout=30, headers={"Authorization": f"Bearer {KEY}"})
        context = int(info.json()["model_max_length"])
        start = time.monotonic()
        stop_at = start + seconds

        def work(i: int) -> None:
            client = _Client(server, model, embed, context, report, start, lock, seed * 1000 + i)
            n = 0
            while time.monotonic() < stop_at:
                try:
                    if i == 0:
                        client.adapter_round(adapter, n)
                        time.sleep(2)
                    else:
                        client.one(next(client.kinds))
                except Exception as exc:  # noqa: BLE001 - a failed request is what the report counts
                    with lock:
                        report.errors.append(f"client {i}: {type(exc).__name__}: {exc}")
                n += 1

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss, fds, nthreads, cpu = _proc(server.process.pid)
            try:
                tokens = server.metric("lmkernel_generation_tokens_total")
            except (httpx.HTTPError, KeyError):  # a slow answer under load: keep the last count
                tokens = report.samples[-1].tokens if report.samples else 0.0
            report.samples.append(Sample(time.monotonic() - start, rss, fds, nthreads, cpu, tokens, _steal_seconds(),
                                         _probe_gflops()))
            time.sleep(min(5.0, max(0.5, seconds / 60)))
        time.sleep(1.0)  # the last aborted streams reach the engine's next step
        report.kv_free = server.metric("lmkernel_kv_cache_free_blocks")
        report.kv_total = server.metric("lmkernel_kv_cache_total_blocks")
    finally:
        report.exit_code = server.stop()
    return report
