"""`lmk bench` on lmkernel's applications against their peers: fine-tuning, the stream monitor, the
recommender, and offline `lmk batch` against `lmk serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from rich.table import Table

from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.cli import Device, Opt, console, fail
from lmkernel.cli.bench import bench_app
from lmkernel.errors import LmkError
from lmkernel.registry import resolve

if TYPE_CHECKING:
    from lmkernel.bench.monitor import DelayRow, Replay
    from lmkernel.bench.recommend import Prepared

MonitorDefaults = MonitorConfig()


@bench_app.command("train")
def bench_train(
    model: Annotated[str, Opt(help="the encoder to fine-tune")] = "all-minilm-l6-v2",
    steps: Annotated[int, Opt(help="steps each side runs for the speed and memory comparison")] = 40,
    batch_size: Annotated[int, Opt()] = 16,
    skip_quality: Annotated[bool, Opt(help="only the speed and memory comparison")] = False,
    train_data: Annotated[Path | None, Opt(
        help="Financial PhraseBank training JSON lines (default: the repository's shared/data/financial-phrasebank/train.jsonl)")] = None,
    valid_data: Annotated[Path | None, Opt(
        help="its validation JSON lines, for the accuracy runs (default: shared/data/financial-phrasebank/valid.jsonl)")] = None,
) -> None:
    """Fine-tuning on Financial PhraseBank: accuracy of full and LoRA runs with the defaults, and speed
    and peak memory against Hugging Face Trainer (+ peft) on the same steps."""
    from lmkernel.bench.train import run_child
    from lmkernel.bench.workload import shared_file

    try:
        train_file = shared_file("financial-phrasebank/train.jsonl", "--train-data", train_data)
        valid_file = None if skip_quality else shared_file("financial-phrasebank/valid.jsonl", "--valid-data", valid_data)
        model_dir = str(resolve(model).path)
        table = Table(title=f"{model}: {steps} steps of {batch_size} PhraseBank sentences, each side in a fresh process")
        for col in ("method", "lmkernel tok/s", "peer tok/s", "speed", "lmkernel peak RSS MB", "peer peak RSS MB", "memory"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for lora in (False, True):
            flags = ["--model", model_dir, "--data", str(train_file), "--steps", str(steps),
                     "--batch-size", str(batch_size), *(["--lora"] if lora else [])]
            ours, peer = run_child("ours", *flags), run_child("hf", *flags)
            table.add_row("LoRA r=8" if lora else "full", f"{ours['tokens_per_s']:,.0f}", f"{peer['tokens_per_s']:,.0f}",
                          f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x", f"{ours['peak_rss_bytes'] / 1e6:,.0f}",
                          f"{peer['peak_rss_bytes'] / 1e6:,.0f}", f"{ours['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x")
        console.print(table)
        if skip_quality:
            return
        table = Table(title="lmkernel defaults on the whole train split, scored on valid (best evaluation)")
        for col in ("method", "accuracy", "macro-F1", "steps", "wall time s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for lora in (False, True):
            q = run_child("quality", "--model", model_dir, "--data", str(train_file),
                          "--valid", str(valid_file), *(["--lora"] if lora else []))
            table.add_row("LoRA r=8" if lora else "full", f"{q['accuracy']:.4f}", f"{q['macro_f1']:.4f}",
                          f"{q['best_step']}/{q['steps']}", f"{q['seconds']:.0f}")
        console.print(table)
    except (LmkError, RuntimeError) as exc:
        raise fail(exc) from None


@bench_app.command("monitor")
def bench_monitor(
    model: Annotated[str | None, Opt(help="a classifier run (`lmk train --task classify`) for the replayed PhraseBank streams")] = None,
    streams: Annotated[int, Opt(help="random streams per burst shape")] = 200,
    calm_records: Annotated[int, Opt(help="length of each calm stream for the false-alert count")] = 10_000,
    calm_streams: Annotated[int, Opt(help="calm streams for the false-alert count")] = 100,
    base: Annotated[float, Opt(help="the watched label's share in calm records")] = 0.1,
    shift: Annotated[float, Opt(help="the CUSUM's odds ratio")] = MonitorDefaults.shift,
    threshold: Annotated[float, Opt(help="the CUSUM's threshold")] = MonitorDefaults.threshold,
    valid_data: Annotated[Path | None, Opt(
        help="held-out PhraseBank JSON lines for the replay (default: shared/data/financial-phrasebank/valid.jsonl)")] = None,
    device: Device = "auto",
) -> None:
    """The stream monitor's detectors: delay from a burst's start to its alert and false alerts per 10,000
    calm records, on simulated streams and on replayed PhraseBank predictions."""
    from dataclasses import replace

    from lmkernel.bench import monitor as mb


    try:
        cusum = replace(MonitorDefaults, shift=shift, threshold=threshold).check()
        replay = None if model is None else _classifier_replay(model, valid_data, cusum.label, device)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    for name, config in mb.configs(cusum):
        _print_simulated(name, config, base, streams, calm_records, calm_streams)
        if replay is not None:
            _print_replayed(name, config, replay, model, cusum.label, base, streams, calm_records, calm_streams)


def _classifier_replay(model: str, valid_data: Path | None, label: str, device: str) -> Replay:
    """The held-out PhraseBank sentences, each classified once by `model`, for streams of real predictions."""
    from lmkernel.bench.monitor import classifier_replay
    from lmkernel.bench.workload import shared_file

    rows = [json.loads(line) for line in shared_file("financial-phrasebank/valid.jsonl", "--valid-data", valid_data)
            .read_text(encoding="utf-8").splitlines() if line.strip()]
    return classifier_replay(model, rows, label, device)


def _delay_table(title: str) -> Table:
    """An empty table of burst delays, one row a burst shape (`_delay_cells`)."""
    table = Table(title=title)
    for col in ("calm before", "burst records", "share", "median delay", "p90 delay", "detected", "within 20", "false alert before"):
        table.add_column(col, justify="right")
    return table


def _print_simulated(name: str, config: MonitorConfig, base: float, streams: int, calm_records: int,
                     calm_streams: int) -> None:
    """One detector on simulated bursts of several lengths and shares, then its false alerts on calm streams."""
    from lmkernel.bench import monitor as mb

    table = _delay_table(f"{name}: simulated bursts, calm records at {base:.0%}, {streams} streams each")
    shapes = [(300, n, p) for n in (20, 40, 60) for p in (0.3, 0.5, 0.8)] + [(100, 60, 0.5), (1000, 60, 0.5)]
    for row in mb.simulated_delays(config, base, shapes, streams):
        table.add_row(*_delay_cells(row))
    console.print(table)
    fa = mb.false_alerts_per_10k(config, lambda rng: rng.random() < base, calm_records, calm_streams)
    console.print(f"{name}: {fa:.2f} false alerts per 10,000 calm records ({calm_streams} streams of {calm_records:,})")


def _print_replayed(name: str, config: MonitorConfig, replay: Replay, model: str | None, label: str, base: float,
                    streams: int, calm_records: int, calm_streams: int) -> None:
    """One detector on streams drawn from the classifier's real predictions: burst delays, then false alerts."""
    from lmkernel.bench import monitor as mb

    table = _delay_table(f"{name}: replayed PhraseBank predictions of {model}, 300 calm sentences at {base:.0%} "
                         f"{label}, a burst, 200 calm")
    for length, share in ((20, 0.5), (40, 0.5), (60, 0.5), (60, 0.8), (60, 1.0)):
        table.add_row(*_delay_cells(mb.replay_delays(replay, config, base, length, share, min(streams, 100))))
    console.print(table)
    fa = mb.replay_false_alerts(replay, config, base, calm_records, max(1, calm_streams // 5))
    console.print(f"{name}: {fa:.2f} false alerts per 10,000 replayed calm sentences "
                  f"(predicted {label} share {sum(replay.others) / len(replay.others):.1%} among the others, "
                  f"{sum(replay.watched) / len(replay.watched):.1%} among true {label})")


def _delay_cells(row: DelayRow) -> list[str]:
    """A delay row's cells: counts as they are, shares as percentages, a missing delay as -."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    return [str(row.calm), str(row.length), f"{row.share:.0%}", num(row.median), num(row.p90), f"{row.detected:.0%}",
            f"{row.within_20:.0%}", f"{row.early:.0%}"]


@bench_app.command("recommend")
def bench_recommend(
    peer: Annotated[str, Opt(help="recbole: its Pop, ItemKNN, BPR and SASRec with their default configurations")] = "recbole",
    peers: Annotated[str, Opt(help="comma-separated RecBole models to run")] = "Pop,ItemKNN,BPR,SASRec",
    cold_fraction: Annotated[float, Opt(help="items made cold for the cold-start table (0: skip it)")] = 0.1,
    cold_peers: Annotated[str, Opt(help="RecBole models also run on the cold-start data")] = "Pop,ItemKNN,BPR",
    encoder_steps: Annotated[int, Opt(help="lmkernel's encoder fine-tuning steps")] = 300,
    peer_timeout: Annotated[float, Opt(help="seconds one RecBole model may take")] = 3600.0,
    seed: Annotated[int, Opt()] = 0,
) -> None:
    """Recommendation on MovieLens-100k: lmkernel against RecBole on the same leave-one-out split, full ranking."""
    from lmkernel.apps.item_encoder import EncoderTraining
    from lmkernel.apps.recommend_data import movielens_100k, read_interactions, read_items
    from lmkernel.apps.recommender import RecommenderConfig
    from lmkernel.bench import recommend as rb

    try:
        chosen, cold = _recommend_peers(peer, peers, cold_peers, cold_fraction)
        inter_path, item_path = movielens_100k()
        items = read_items(item_path)
        data = read_interactions(inter_path, items)
        config = RecommenderConfig(encoder_training=EncoderTraining(steps=encoder_steps, seed=seed), seed=seed)
        root = rb.temp_root()
        runs = [("all items", rb.prepare(data, items, root, "ml100k", 0.0, seed), chosen)]
        if cold_fraction:
            runs.append((f"cold start ({cold_fraction:.0%} of items)",
                         rb.prepare(data, items, root, "ml100kcold", cold_fraction, seed), cold))
        for title, prepared, models in runs:
            results, failed = rb.run_models(prepared, config, root, models, peer_timeout, console.print)
            console.print(_recommend_table(title, prepared, results))
            for line in failed:
                console.print(f"[red]not measured[/]: {line}")
    except (LmkError, RuntimeError, ValueError, OSError, subprocess_error()) as exc:
        raise fail(exc) from None


def _recommend_peers(peer: str, peers: str, cold_peers: str, cold_fraction: float) -> tuple[list[str], list[str]]:
    """The RecBole models of --peers and of --cold-peers, once every flag is checked (before any data is read)."""
    from lmkernel.bench.recommend import PEERS

    if peer != "recbole":
        raise LmkError(f"--peer must be recbole; got {peer!r}")
    chosen = [p for p in peers.split(",") if p]
    for flag, names in (("--peers", chosen), ("--cold-peers", cold_peers.split(","))):
        unknown = [p for p in names if p and p not in PEERS]
        if unknown:
            raise LmkError(f"{flag}: {', '.join(unknown)} not among {', '.join(PEERS)}")
    if not 0 <= cold_fraction < 0.5:
        raise LmkError(f"--cold-fraction must be in [0, 0.5); got {cold_fraction}")
    return chosen, [p for p in cold_peers.split(",") if p]


def _recommend_table(title: str, prepared: Prepared, results: list[dict]) -> Table:
    """Every side's HR, NDCG and MRR at 10 on one split (and on its cold users), lmkernel's NDCG against each."""
    from lmkernel.bench.recommend import score

    table = Table(title=f"MovieLens-100k, {title}: leave-one-out by time, full ranking, @10")
    for col in ("model", "users", "HR@10", "NDCG@10", "MRR@10", "lmkernel NDCG / this", "RecBole's own NDCG@10", "epochs", "time s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    subsets = [("", None)] + ([(" (cold users)", prepared.cold_users)] if prepared.cold_users else [])
    ours_ndcg = {}
    for suffix, users in subsets:
        for r in results:
            m = score(r["top10"], prepared.targets, users)
            if r["model"] == "lmkernel":
                ours_ndcg[suffix] = m["ndcg@10"]
            own = r.get("test", {}).get("ndcg@10") if not suffix else None
            ratio = f"{ours_ndcg[suffix] / m['ndcg@10']:.2f}x" if m["ndcg@10"] else "peer 0"
            table.add_row(r["model"] + suffix, str(m["users"]), f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}",
                          f"{m['mrr@10']:.4f}", "-" if r["model"] == "lmkernel" else ratio,
                          "-" if own is None else f"{own:.4f}", str(r.get("epochs") or "-"), f"{r['seconds']:.0f}")
    return table


def subprocess_error() -> type[Exception]:
    """What a RecBole child that ran out of time raises; subprocess is imported only when the command runs."""
    import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell

    return subprocess.TimeoutExpired


@bench_app.command("batch")
def bench_batch(
    model: Annotated[str, Opt(help="the model both sides serve")] = "smollm2-135m-instruct",
    requests: Annotated[int, Opt(help="completions in the file")] = 256,
    clients: Annotated[int, Opt(help="concurrent clients against lmk serve")] = 32,
    prompt_tokens: Annotated[str, Opt(help="prompt lengths, MIN-MAX tokens")] = "64-256",
    output_tokens: Annotated[str, Opt(help="generated lengths, MIN-MAX tokens")] = "32-128",
    kv_cache_memory: Annotated[str, Opt("--kv-cache-memory", help="each side's KV cache")] = "1GiB",
    seed: Annotated[int, Opt()] = 0,
) -> None:
    """Offline `lmk batch` against `lmk serve` with concurrent clients on the same requests: completion tokens/s."""
    import tempfile

    from lmkernel.bench import batch as bb
    from lmkernel.bench.workload import text_workload
    from lmkernel.loading import load_model

    try:
        def span(text: str, flag: str) -> tuple[int, int]:
            low, _, high = text.partition("-")
            if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
                raise LmkError(f"{flag} must be MIN-MAX tokens, e.g. 64-256; got {text!r}")
            return int(low), int(high)

        tokenizer = load_model(model).tokenizer
        work = text_workload(tokenizer, requests, span(prompt_tokens, "--prompt-tokens"),
                             span(output_tokens, "--output-tokens"), seed)
        bodies = bb.bodies(work, model)
        root = Path(tempfile.mkdtemp(prefix="lmk-bench-batch-"))
        bb.write_batch_file(root / "in.jsonl", bodies)
        engine_args = ["--kv-cache-memory", kv_cache_memory]
        batch = bb.run_batch(root / "in.jsonl", root / "out.jsonl", model, engine_args, requests)
        serve = bb.run_serve(bodies, model, engine_args, clients, root / "serve.log")
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    table = Table(title=f"{model}: {requests} completions ({prompt_tokens} prompt, {output_tokens} generated tokens, greedy)")
    for col in ("side", "seconds", "requests/s", "completion tok/s", "vs lmk serve"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for side in (batch, serve):
        table.add_row(side.name, f"{side.seconds:.1f}", f"{side.requests / side.seconds:.2f}", f"{side.tokens_per_second:.1f}",
                      f"{side.tokens_per_second / serve.tokens_per_second:.2f}x")
    console.print(table)
