"""`lmk bench serve`: streaming clients against `lmk serve`, and the same load through in-process generation
or against llama.cpp's llama-server, one level of concurrency after another."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lmkernel.cli import Device, KVMemory, console, fail
from lmkernel.cli.bench import bench_app
from lmkernel.errors import LmkError
from lmkernel.registry import resolve

if TYPE_CHECKING:
    from lmkernel.bench.serve import PeerRun
    from lmkernel.bench.workload import Workload
    from lmkernel.loading import LoadedModel


@bench_app.command("serve")
def bench_serve(
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    concurrency: Annotated[list[int] | None, typer.Option(help="streaming clients; repeat for more levels")] = None,
    requests_per_client: Annotated[int, typer.Option()] = 4,
    min_prompt: Annotated[int, typer.Option()] = 16,
    max_prompt: Annotated[int, typer.Option()] = 256,
    output_tokens: Annotated[int, typer.Option()] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    kv_cache_memory: KVMemory = "1GiB",
    device: Device = "auto",
    peer: Annotated[str | None, typer.Option(help="llama-server: the same load against llama.cpp's own server "
                                                  "(GGUF models); default: against in-process LLM.generate")] = None,
    peer_binary: Annotated[Path | None, typer.Option(help="a llama-server binary to run instead of building one")] = None,
    peer_cmake_args: Annotated[str | None, typer.Option(help="cmake flags for building llama-server (default: native; "
                                                             "AVX-512 VNNI without AMX on CPUs that report AMX)")] = None,
) -> None:
    """Streaming clients over HTTP against `lmk serve`, then the same load through `LLM.generate` or against
    `llama-server` (--peer llama-server), one level of concurrency after another."""
    import tempfile

    from lmkernel.bench.serve import http_and_in_process, start_server_process
    from lmkernel.bench.workload import text_workload
    from lmkernel.loading import load_model

    levels = concurrency or [1, 8, 32]
    if peer is not None and peer != "llama-server":
        raise fail(LmkError(f"--peer {peer}: the serving peer is llama-server"))
    try:
        if peer is not None and resolve(model).kind != "gguf":
            raise LmkError(f"{model}: llama-server runs GGUF files; this is a {resolve(model).kind}")
        loaded = load_model(model, device=device)
        # A seed per level (and another for the warm-up): no prompt repeats, so no prefix cache serves one.
        works = {c: text_workload(loaded.tokenizer, c * requests_per_client, (min_prompt, max_prompt),
                                      (output_tokens, output_tokens), seed + c) for c in levels}
        if peer is not None:
            works[0] = text_workload(loaded.tokenizer, 4, (min_prompt, max_prompt), (8, 8), seed + 10_000)
            return _serve_against_llama_server(model, loaded, works, kv_cache_memory, device, peer_binary,
                                               peer_cmake_args, (min_prompt, max_prompt), output_tokens)
        log = Path(tempfile.mkdtemp(prefix="lmk-bench-serve-")) / "serve.log"
        server = start_server_process([model, "--kv-cache-memory", kv_cache_memory, "--device", device], log)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    table = Table(title=f"{model}, {output_tokens} output tokens a request, prompts {min_prompt}-{max_prompt} tokens")
    for col in ("clients", "requests", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="right")
    http, inproc = http_and_in_process(server, loaded, model, kv_cache_memory, works, levels)
    for c in levels:
        r = http[c]
        table.add_row(str(c), str(r.requests), f"{r.requests_per_second:.2f}", f"{r.tokens_per_second:.1f}",
                      f"{r.percentile('ttft', 50):.0f}", f"{r.percentile('ttft', 99):.0f}",
                      f"{r.percentile('itl', 50):.0f}", f"{r.percentile('itl', 99):.0f}")
    console.print(table)
    for c in levels:
        a, b = http[c], inproc[c]
        console.print(f"{c} clients: HTTP {a.tokens_per_second:.1f} tok/s, in-process LLM.generate "
                      f"{b.tokens_per_second:.1f} tok/s; HTTP overhead {1 - a.tokens_per_second / b.tokens_per_second:.1%}")


def _serve_against_llama_server(model: str, loaded: LoadedModel, works: dict[int, Workload], kv_cache_memory: str, device: str,
                                peer_binary: Path | None, cmake_args: str | None, prompts: tuple[int, int],
                                output_tokens: int) -> None:
    """`lmk bench serve --peer llama-server`: each level against `lmk serve`, then against a llama-server with
    one slot per stream (continuous batching, same threads); the step breakdown at the level nearest 8."""
    from lmkernel.bench.llama_server_peer import CONTEXT_PER_SLOT
    from lmkernel.bench.machine import cpu_name
    from lmkernel.bench.serve import against_llama_server
    from lmkernel.layers import cpu_kernels

    run = against_llama_server(model, loaded, works, kv_cache_memory, device, peer_binary, cmake_args, output_tokens,
                               console.print)
    threads, limits = run.threads, run.limits
    console.print(f"{model} ({loaded.source.path.name}) on {cpu_name()}, {threads} threads; prompts {prompts[0]}-{prompts[1]} "
                  f"tokens (distinct), {output_tokens} tokens each (ignore_eos), each client sends its next request "
                  f"when the last ends")
    console.print(f"lmkernel kernels: {cpu_kernels.current_path()}; llama-server {run.binary}, {run.build}; -t {threads} -tb "
                  f"{threads} -np STREAMS -c {CONTEXT_PER_SLOT}*STREAMS -cb")
    console.print(_servers_table(run))
    console.print(_time_split_table(run))
    console.print(f"limits measured in this run: read bandwidth {limits.bandwidth_gbs:.1f} GB/s, int8 peak "
                  f"{limits.peak_tmacs:.2f} T multiply-adds/s on {limits.units}")


def _servers_table(run: PeerRun) -> Table:
    """lmk serve against llama-server at each level: throughput, its ratio, time to first token and between tokens."""
    table = Table("streams", "requests", "lmk serve tok/s", "llama-server tok/s", "ratio", "TTFT p50 s (lmk / llama)",
                  "TTFT p99 s", "ITL p50 ms", "ITL p99 ms")
    for c in run.levels:
        a, b = run.ours[c], run.theirs[c]
        table.add_row(str(c), str(a.requests), f"{a.tokens_per_second:.1f}", f"{b.tokens_per_second:.1f}",
                      f"{a.tokens_per_second / b.tokens_per_second:.2f}x",
                      f"{a.percentile('ttft', 50) / 1000:.2f} / {b.percentile('ttft', 50) / 1000:.2f}",
                      f"{a.percentile('ttft', 99) / 1000:.2f} / {b.percentile('ttft', 99) / 1000:.2f}",
                      f"{a.percentile('itl', 50):.0f} / {b.percentile('itl', 50):.0f}",
                      f"{a.percentile('itl', 99):.0f} / {b.percentile('itl', 99):.0f}")
    return table


def _time_split_table(run: PeerRun) -> Table:
    """Where lmk serve's time went at the watched level, each part against the machine's limit that bounds it."""
    p, limits, watched, mean_context = run.phases, run.limits, run.watched, run.mean_context
    wall = run.ours[watched].seconds
    steps, tokens = p["lmkernel_engine_steps:decode"], p["lmkernel_engine_tokens:decode"]
    prefill_steps, prompt_tokens = p["lmkernel_engine_steps:prefill"], p["lmkernel_engine_tokens:prompt"]
    split = Table(f"where lmk serve's time went at {watched} streams ({wall:.1f} s)", "seconds", "share", "per step",
                  "against the machine")
    per_decode = p["forward_decode"] / max(steps, 1) * 1000
    rows = [
        ("prefill (forward of steps with prompt tokens)", p["forward_prefill"], f"{prefill_steps:.0f} of them",
         f"{prompt_tokens / max(p['forward_prefill'], 1e-9):.0f} prompt tok/s; projections at the int8 peak: "
         f"{limits.prefill_limit_tps:.0f}"),
        (f"decode forward ({tokens / max(steps, 1):.1f} sequences a step)", p["forward_decode"], f"{per_decode:.1f} ms",
         f"bandwidth floor {limits.floor_ms:.1f} ms, compute {limits.compute_ms:.1f} ms"),
        (f"  of which attention ({mean_context}-token contexts, measured alone)", limits.attention_ms * steps / 1000,
         f"{limits.attention_ms:.1f} ms", ""),
        ("  of which projections, norms, rotary (the rest)", max(0.0, p["forward_decode"] - limits.attention_ms * steps / 1000),
         f"{max(0.0, per_decode - limits.attention_ms):.1f} ms",
         f"{limits.floor_ms / max(per_decode - limits.attention_ms, 1e-9):.0%} of the bandwidth"),
        ("output layer (logits)", p["logits"], "", ""),
        ("sampling", p["sampling"], "", ""),
        ("scheduling, detokenizing, stop checks", p["schedule"] + p["process"], "", ""),
        ("HTTP, streaming, the event loop, idle", p["HTTP and the rest"], "", ""),
    ]
    for name, seconds, per, against in rows:
        split.add_row(name, f"{seconds:.1f}", f"{seconds / wall:.0%}", per, against)
    return split
