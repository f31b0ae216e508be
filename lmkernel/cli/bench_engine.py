"""`lmk bench` on what the engine's parts cost: a decode step as the batch grows, the KV memory of the hybrid
cache, the JSON-schema mask of structured output, and every compressed variant of a model side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmkernel.cli import KVMemory, console, fail
from lmkernel.cli.bench import bench_app
from lmkernel.errors import LmkError


@bench_app.command("decode-steps")
def bench_decode_steps(
    model: Annotated[str, typer.Option()] = "qwen2.5-coder-1.5b-instruct",
    batch: Annotated[list[int] | None, typer.Option(help="batch sizes (default 1, 8, 16, 32)")] = None,
    new_tokens: Annotated[int, typer.Option()] = 32,
    rounds: Annotated[int, typer.Option()] = 3,
) -> None:
    """A decode step's cost as the batch grows (weights read once a step for all sequences), with AMX tiles
    and, where the CPU grants them, without, alternating in one run."""
    from lmkernel.bench.decode_steps import step_costs
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM
    from lmkernel.layers import cpu_kernels

    sizes = batch or [1, 8, 16, 32]
    if min(sizes) < 1:
        raise fail(LmkError(f"--batch must be at least 1; got {min(sizes)}"))
    try:
        llm = LLM(model, kv_cache_memory="1GiB", verbose=False, enable_prefix_caching=False, max_num_seqs=max(sizes))
        prompts = text_workload(llm.tokenizer, max(sizes), (64, 64), (1, 1)).prompts
        results = step_costs(llm, prompts, sizes, new_tokens, rounds)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    import torch

    base = results[0].ms
    table = Table("batch", "decode step", "tok/s", f"step / step of {results[0].batch}", "tiles off: step", "tiles off: tok/s")
    for r in results:
        off = ("", "") if r.vector_ms is None else (f"{r.vector_ms:.1f} ms", f"{1000 * r.batch / r.vector_ms:.1f}")
        table.add_row(str(r.batch), f"{r.ms:.1f} ms", f"{1000 * r.batch / r.ms:.1f}", f"{r.ms / base:.2f}x", *off)
    console.print(f"{model}, {torch.get_num_threads()} threads, CPU kernels {cpu_kernels.current_path()}; medians of "
                  f"{rounds} alternating rounds, 64-token prompts, {new_tokens} tokens each")
    console.print(table)


@bench_app.command("kv-memory")
def bench_kv_memory(
    model: Annotated[str, typer.Option()] = "gemma-3-270m",
    context: Annotated[list[int] | None, typer.Option(help="prompt lengths in tokens (default 1024, 4096, 8192)")] = None,
    new_tokens: Annotated[int, typer.Option()] = 16,
    max_num_batched_tokens: Annotated[int, typer.Option(help="prompt tokens a step (the chunk a prompt is cut in)")] = 2048,
    kv_cache_memory: KVMemory = "2GiB",
    text: Annotated[Path | None, typer.Option(help="text the prompts are cut from (default: WikiText-2 valid)")] = None,
) -> None:
    """KV memory one long sequence holds with the hybrid cache (sliding-window layers give back blocks that left
    their window) against every layer keeping every block, on the same model in one run."""
    from lmkernel.bench.kv_memory import measure
    from lmkernel.bench.workload import shared_file, text_workload
    from lmkernel.loading import load_model

    lengths = context or [1024, 4096, 8192]
    if min(lengths) < 1 or new_tokens < 1:
        raise fail(LmkError(f"--context and --new-tokens must be at least 1; got {min(lengths)} and {new_tokens}"))
    try:
        loaded = load_model(model)
        wikitext = shared_file("wikitext-2/valid.txt", "--text", text)
        prompts = [text_workload(loaded.tokenizer, 1, (n, n), (1, 1), text_file=wikitext).prompts[0] for n in lengths]
        rows = measure(loaded, prompts, new_tokens, kv_cache_memory, max_num_batched_tokens)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    c = loaded.config
    windows = sorted({w for w in map(c.window, range(c.num_layers)) if w is not None})
    table = Table("context", "hybrid: decoding", "full: decoding", "full / hybrid", "hybrid: peak", "full: peak",
                  "full from shape", "same tokens", "hybrid s", "full s")
    mib = 1 << 20
    for r in rows:
        table.add_row(str(r.context), f"{r.hybrid.decode_bytes / mib:.1f} MiB", f"{r.full.decode_bytes / mib:.1f} MiB",
                      f"{r.ratio:.2f}x", f"{r.hybrid.peak_bytes / mib:.1f} MiB", f"{r.full.peak_bytes / mib:.1f} MiB",
                      f"{r.full_from_shape / mib:.1f} MiB",
                      "yes" if r.hybrid.token_ids == r.full.token_ids else "NO",
                      f"{r.hybrid.seconds:.1f}", f"{r.full.seconds:.1f}")
    sliding = sum(c.window(i) is not None for i in range(c.num_layers))
    console.print(f"{model}: {c.num_layers} layers, {sliding} with a sliding window of {windows or 'none'}; KV bytes one "
                  f"sequence holds while it decodes {new_tokens} greedy tokens after its prompt, and at its peak (inside a "
                  f"prompt step of up to {max_num_batched_tokens} tokens, before blocks past the window go back)")
    console.print(table)


@bench_app.command("structured")
def bench_structured(
    model: Annotated[str, typer.Option()] = "qwen2.5-coder-0.5b-instruct",
    batch: Annotated[list[int] | None, typer.Option(help="batch sizes to measure (default 1 and 8)")] = None,
    new_tokens: Annotated[int, typer.Option()] = 64,
    rounds: Annotated[int, typer.Option()] = 3,
) -> None:
    """The cost of structured output per decode step: the same requests with and without a JSON-schema
    grammar, alternating in one run."""
    from lmkernel.bench.structured import mask_cost
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM

    sizes = batch or [1, 8]
    if min(sizes) < 1:
        raise fail(LmkError(f"--batch must be at least 1; got {min(sizes)}"))
    try:
        llm = LLM(model, kv_cache_memory="512MiB", verbose=False, enable_prefix_caching=False)
        prompts = text_workload(llm.tokenizer, max(sizes), (64, 64), (1, 1)).prompts
        results = [mask_cost(llm, prompts, b, new_tokens, rounds) for b in sizes]
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    table = Table("batch", "decode step, free", "decode step, JSON schema", "cost of the mask")
    for r in results:
        table.add_row(str(r.batch), f"{r.free_ms:.2f} ms", f"{r.masked_ms:.2f} ms", f"{r.overhead:+.1%}")
    import torch

    console.print(f"{model}, {torch.get_num_threads()} threads; medians of {rounds} alternating rounds, {new_tokens} tokens each")
    console.print(table)


@bench_app.command("compress")
def bench_compress(
    model: Annotated[str, typer.Option(help="the causal LM")] = "smollm2-135m-instruct",
    encoder: Annotated[str, typer.Option(help="the sentence encoder")] = "all-minilm-l6-v2",
    max_tokens: Annotated[int, typer.Option(help="WikiText-2 tokens perplexity scores")] = 4096,
    calibration_sequences: Annotated[int, typer.Option(help="128-token windows for GPTQ, Wanda and structured")] = 128,
    sentences: Annotated[int, typer.Option(help="PhraseBank sentences the encoder variants embed")] = 256,
    text: Annotated[Path | None, typer.Option(
        help="WikiText-2 validation text, for perplexity and calibration (default: the repository's shared/data/wikitext-2/valid.txt)")] = None,
    phrasebank: Annotated[Path | None, typer.Option(
        help="Financial PhraseBank JSON lines, for the encoder (default: the repository's shared/data/financial-phrasebank/valid.jsonl)")] = None,
) -> None:
    """Every compressed variant side by side: size, resident memory, quality change and speed."""
    import tempfile

    from lmkernel.bench.compress import run_decoder, run_encoder
    from lmkernel.bench.workload import shared_file

    with tempfile.TemporaryDirectory(prefix="lmk-bench-compress-") as tmp:
        try:
            wikitext = shared_file("wikitext-2/valid.txt", "--text", text)
            phrasebank = shared_file("financial-phrasebank/valid.jsonl", "--phrasebank", phrasebank)
            work = Path(tmp)
            (work / "dec").mkdir()
            (work / "enc").mkdir()
            log = lambda line: console.print(f"[dim]{line}[/dim]")  # noqa: E731
            dec = run_decoder(model, work / "dec", wikitext, max_tokens, calibration_sequences, log)
            texts = [json.loads(line)["text"] for line in phrasebank.read_text().splitlines() if line.strip()][:sentences]
            enc = run_encoder(encoder, work / "enc", texts, log)
        except (LmkError, ValueError, OSError) as exc:
            raise fail(exc) from None
    for title, rows, quality, speeds in (
        (f"{model}: perplexity on the first {max_tokens} WikiText-2 tokens", dec, "perplexity",
         ("decode b1 tok/s", "decode b16 tok/s", "prefill tok/s")),
        (f"{encoder}: {len(texts)} PhraseBank sentences, cosine to float32", enc, "cosine",
         ("b1 sent/s", "b16 sent/s", "b16 tok/s")),
    ):
        base = rows[0]
        table = Table(title=title)
        for col in ("variant", "size MB (smaller)", "RSS MB", f"{quality} (change)", *speeds):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in rows:
            change = r.quality / base.quality - 1 if quality == "perplexity" else r.quality - 1
            table.add_row(r.name, f"{r.size_bytes / 1e6:.1f} ({base.size_bytes / r.size_bytes:.2f}x)",
                          f"{r.rss_bytes / 1e6:.0f}", f"{r.quality:.4f} ({change:+.2%})",
                          *(f"{v:.{0 if i == 2 else 1}f} ({x:.2f}x)" for i, (v, x) in enumerate(zip(r.speeds(), r.speedup))))
        console.print(table)
