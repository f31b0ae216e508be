"""`lmk bench crash` and `lmk bench soak`: commands killed at random moments and rerun, and `lmk serve` under
mixed traffic for a set time; each run fails (exit 1) when anything it checks went wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmkernel.cli import KVMemory, console, fail
from lmkernel.cli.bench import bench_app
from lmkernel.errors import LmkError


@bench_app.command("crash")
def bench_crash(
    command: Annotated[list[str] | None, typer.Option(help="batch, train, quantize, pull, recommend, tune (default: all)")] = None,
    kill_points: Annotated[int, typer.Option(help="kills per command")] = 20,
    kills_per_trial: Annotated[int, typer.Option(help="kills before each rerun to the end")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    work_dir: Annotated[Path | None, typer.Option(help="where the runs write (default: a temporary directory)")] = None,
) -> None:
    """Kill each long-running command (SIGKILL) at seeded random moments, rerun it, and check that nothing
    half-written sat under a final name and that the rerun ended where an uninterrupted run ends."""
    import tempfile

    from lmkernel.bench import crash
    from lmkernel.bench.workload import SHARED_DATA

    root = work_dir or Path(tempfile.mkdtemp(prefix="lmk-bench-crash-"))
    cases = crash.cases(root, SHARED_DATA / "financial-phrasebank")
    unknown = sorted(set(command or []) - set(cases))
    if unknown:
        raise fail(LmkError(f"--command {', '.join(unknown)}: expected some of {', '.join(cases)}"))
    table = Table("command", "kill points", "killed while running", "reruns", "ended as uninterrupted",
                  "reference run s", title=f"SIGKILL at seeded random moments (seed {seed}), then the same command again")
    problems = []
    for name in command or list(cases):
        row = crash.campaign(cases[name](), root, kill_points, kills_per_trial, seed)
        table.add_row(row.name, str(row.kill_points), str(row.killed_running), str(row.reruns),
                      f"{row.reruns_correct} of {row.reruns}", f"{row.reference_seconds:.1f}")
        problems += [f"{row.name}: {p}" for p in row.problems]
    console.print(table)
    for p in problems:
        console.print(p, highlight=False)
    if problems:
        raise typer.Exit(1)


@bench_app.command("soak")
def bench_soak(
    model: Annotated[str, typer.Option()] = "qwen2.5-coder-1.5b-instruct",
    embedding_model: Annotated[str, typer.Option()] = "all-minilm-l6-v2",
    minutes: Annotated[float, typer.Option(help="how long the clients send")] = 30.0,
    clients: Annotated[int, typer.Option(help="concurrent clients (one of them loads and unloads adapters)")] = 16,
    kv_cache_memory: KVMemory = "1GiB",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """`lmk serve` under mixed traffic for a set time, then SIGTERM: statuses per kind (no 5xx, every other non-2xx
    the expected 4xx), memory, descriptors and threads over time, latency per kind in each third, KV blocks at the end."""
    import tempfile

    from lmkernel.bench.soak import KINDS, soak

    try:
        r = soak(model, embedding_model, minutes * 60, clients, Path(tempfile.mkdtemp(prefix="lmk-bench-soak-")),
                 kv_cache_memory, seed)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    table = Table("kind", "requests", "statuses", "p50 / p99 s, first third", "second third", "last third",
                  "p50 last / first", "at equal machine speed",
                  title=f"{model} + {embedding_model}, {clients} clients, {minutes:g} min")
    for kind in KINDS:
        if kind not in r.counts:
            continue
        cells = [f"{p[0]:.2f} / {p[1]:.2f}" if (p := r.percentiles(kind, t)) else "" for t in range(3)]
        drift = r.latency_drift(kind)
        table.add_row(kind, str(sum(r.counts[kind].values())), ", ".join(f"{s}: {n}" for s, n in sorted(r.counts[kind].items())),
                      *cells, *([f"{drift[0]:.2f}", f"{drift[1]:.2f}"] if drift else ["", ""]))
    console.print(table)
    first, warm, mid, last = r.samples[0], r.warm(), r.samples[len(r.samples) // 2], r.samples[-1]
    console.print(f"resident memory {first.rss_mib:.0f} / {warm.rss_mib:.0f} / {mid.rss_mib:.0f} / {last.rss_mib:.0f} MiB "
                  f"(start / after warm-up / middle / end), drift after warm-up {r.drift():+.1%}; descriptors {first.fds} / "
                  f"{warm.fds} / {mid.fds} / {last.fds}; threads {first.threads} / {warm.threads} / {mid.threads} / "
                  f"{last.threads}; KV blocks free at the end {r.kv_free:.0f} of "
                  f"{r.kv_total:.0f}; 5xx {r.server_errors}; unexpected statuses {r.unexpected() or 'none'}; exit code "
                  f"after SIGTERM {r.exit_code}", highlight=False)
    work = r.work_by_third()
    console.print("by third: generated tokens/s " + " / ".join(f"{w.tokens_per_s:.1f}" for w in work)
                  + "; server CPU ms a generated token " + " / ".join(f"{w.cpu_ms_per_token:.1f}" for w in work)
                  + "; host steal " + " / ".join(f"{w.steal:.1%}" for w in work)
                  + "; one-thread probe GFLOP/s " + " / ".join(f"{w.probe_gflops:.1f}" for w in work), highlight=False)
    for e in r.errors[:20]:
        console.print(e, highlight=False)
    if r.server_errors or r.unexpected() or r.errors or r.exit_code != 0 or r.kv_free != r.kv_total:
        raise typer.Exit(1)
