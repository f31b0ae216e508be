"""Prometheus metrics of the server, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

STEP_PHASES = ("schedule", "forward_prefill", "forward_decode", "logits", "sampling", "process")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counts, latency histograms, token counters, and engine gauges read at scrape time."""

    def __init__(self, engine_stats: Callable[[], dict[str, float | int]] | None, ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmkernel_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("lmkernel_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmkernel_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmkernel_e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue = Histogram("lmkernel_queue_time_seconds", "Time from arrival to the first scheduled step",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmkernel_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmkernel_generation_tokens", "Tokens generated", registry=r)
        gauges = {
            "running": ("lmkernel_num_requests_running", "Requests being generated", lambda s: s["running"]),
            "waiting": ("lmkernel_num_requests_waiting", "Requests waiting to be scheduled", lambda s: s["waiting"]),
            "kv": ("lmkernel_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                   lambda s: 1 - s["kv_blocks_free"] / s["kv_blocks_total"]),
            "free": ("lmkernel_kv_cache_free_blocks", "Free KV-cache blocks", lambda s: s["kv_blocks_free"]),
            "total": ("lmkernel_kv_cache_total_blocks", "KV-cache blocks", lambda s: s["kv_blocks_total"]),
            "hits": ("lmkernel_prefix_cache_hit_rate", "Prefix-cache hits / queries", lambda s: s["prefix_cache_hit_rate"]),
        }
        for name, doc, read in gauges.values():
            gauge = Gauge(name, doc, registry=r)
            if engine_stats is not None:
                gauge.set_function(lambda read=read: float(read(engine_stats())))
        if engine_stats is not None:
            r.register(_EngineCounters(engine_stats))
        self.ready = Gauge("lmkernel_ready", "1 while the server takes requests; 0 while it drains", registry=r)
        self.ready.set_function(lambda: float(ready()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    """Engine totals exported as counters (so `rate()` applies), read from the engine at scrape time."""

    def __init__(self, engine_stats: Callable[[], dict[str, float | int]]) -> None:
        self.engine_stats = engine_stats

    def collect(self) -> list[Metric]:
        stats = self.engine_stats()
        phases = CounterMetricFamily("lmkernel_engine_step_seconds", "Seconds the engine's steps spent in each phase",
                                     labels=["phase"])
        steps = CounterMetricFamily("lmkernel_engine_steps", "Engine steps, by kind (prefill: carries prompt tokens)",
                                    labels=["kind"])
        tokens = CounterMetricFamily("lmkernel_engine_tokens", "Tokens through the model's forward, by kind",
                                     labels=["kind"])
        for phase in STEP_PHASES:
            phases.add_metric([phase], float(stats[f"step_{phase}_seconds"]))
        for kind in ("prefill", "decode"):
            steps.add_metric([kind], float(stats[f"step_{kind}_steps"]))
        tokens.add_metric(["prompt"], float(stats["step_prompt_tokens"]))
        tokens.add_metric(["decode"], float(stats["step_decode_tokens"]))
        families = [CounterMetricFamily("lmkernel_preemptions", "Requests preempted (blocks freed, recomputed later)",
                                        value=float(stats["preemptions"])), phases, steps, tokens]
        if "spec_checks" in stats:  # speculative decoding is on (vLLM's spec_decode counters)
            for key, name, doc in (
                ("spec_checks", "num_drafts", "Decode rows that checked proposals"),
                ("spec_proposed_tokens", "num_draft_tokens", "Proposed tokens checked"),
                ("spec_accepted_tokens", "num_accepted_tokens", "Proposed tokens the model accepted"),
            ):
                families.append(CounterMetricFamily(f"lmkernel_spec_decode_{name}", doc, value=float(stats[key])))
        return families
