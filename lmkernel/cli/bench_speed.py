"""`lmk bench` on a model's speed: throughput, batch-1 latency, embedding, speculative decoding and the
deterministic mode, each against a peer or the default on the same model in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lmkernel.cli import (CpuPath, Device, Dtype, KVMemory, MaxNumBatchedTokens, MaxNumSeqs, Quantization, console, fail,
                          quantization_arg)
from lmkernel.cli.bench import bench_app
from lmkernel.errors import LmkError

if TYPE_CHECKING:
    from lmkernel.bench.latency import LlamaCppRun


@bench_app.command("throughput")
def bench_throughput(
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    num_requests: Annotated[int, typer.Option()] = 64,
    min_prompt: Annotated[int, typer.Option()] = 16,
    max_prompt: Annotated[int, typer.Option()] = 512,
    min_output: Annotated[int, typer.Option()] = 32,
    max_output: Annotated[int, typer.Option()] = 256,
    hf_batch_size: Annotated[int, typer.Option(help="static batch size of the transformers peer; 0 skips it")] = 8,
    max_num_seqs: MaxNumSeqs = 64,
    max_num_batched_tokens: MaxNumBatchedTokens = 2048,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "2GiB",
) -> None:
    """Tokens/s of lmkernel and of transformers `generate` on the same requests, and their ratio."""
    from lmkernel.bench.peers import load_hf_causal_lm
    from lmkernel.bench.throughput import run_hf_generate, run_lmkernel
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM

    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, verbose=False)
        work = text_workload(llm.tokenizer, num_requests, (min_prompt, max_prompt), (min_output, max_output), seed)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"{num_requests} requests, {work.prompt_tokens} prompt tokens, {work.output_tokens} output tokens, {llm.loaded.dtype}")
    ours = run_lmkernel(llm, work)
    console.print(f"lmkernel: {ours.tokens_per_second:.1f} tok/s ({ours.seconds:.1f} s), KV-cache utilisation {ours.kv_utilisation:.1%}")
    if hf_batch_size > 0:
        peer = run_hf_generate(load_hf_causal_lm(llm.loaded.source, llm.loaded.dtype), llm.tokenizer.pad_token_id or 0, work, hf_batch_size)
        console.print(f"{peer.name}: {peer.tokens_per_second:.1f} tok/s ({peer.seconds:.1f} s)")
        console.print(f"ratio lmkernel / transformers: {ours.tokens_per_second / peer.tokens_per_second:.2f}x")


@bench_app.command("latency")
def bench_latency(
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    prompt_tokens: Annotated[int, typer.Option(help="prompt length; 16-token KV blocks leave the last one half empty on average")] = 128,
    new_tokens: Annotated[int, typer.Option()] = 128,
    prefill_tokens: Annotated[int, typer.Option(help="with --peer llama.cpp: the prompt whose processing is timed")] = 512,
    rounds: Annotated[int, typer.Option()] = 5,
    dtype: Dtype = "auto",
    device: Device = "auto",
    peer: Annotated[str, typer.Option(help="transformers (generate at batch 1), llama.cpp (same GGUF file: decode, "
                                           "prompt processing, load time, memory) or none")] = "transformers",
    quantization: Quantization = "auto",
    cpu_path: CpuPath = "auto",
) -> None:
    """Batch-1 decode ms/token against the floor of weight bytes / read bandwidth measured in this run, and
    against a peer on the same model in the same run."""
    from lmkernel.bench.latency import measure
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM

    if peer not in ("transformers", "llama.cpp", "none"):
        raise fail(LmkError(f"--peer must be transformers, llama.cpp or none; got '{peer}'"))
    if peer == "llama.cpp":
        return _bench_against_llama_cpp(model, prompt_tokens, new_tokens, prefill_tokens, rounds, quantization, cpu_path)
    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory="256MiB", verbose=False,
                  quantization=quantization_arg(quantization), cpu_path=cpu_path)
        prompt = text_workload(llm.tokenizer, 1, (prompt_tokens, prompt_tokens), (1, 1)).prompts[0]
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    try:
        from lmkernel.bench.peers import load_hf_causal_lm

        hf = load_hf_causal_lm(llm.loaded.source, llm.loaded.dtype).to(llm.loaded.device) if peer == "transformers" else None
    except LmkError as exc:
        raise fail(exc) from None
    r = measure(llm, prompt, new_tokens, rounds, hf)
    console.print(f"read bandwidth {r.bandwidth_gbs:.1f} GB/s; floor {r.floor_ms:.2f} ms/token ({llm.loaded.dtype})")
    console.print(f"lmkernel batch-1 decode: {r.ms_per_token:.2f} ms/token = {1000 / r.ms_per_token:.1f} tok/s")
    console.print(f"fraction of the floor: {r.fraction_of_floor:.0%} (median over rounds of each decode against the "
                  f"bandwidth read beside it; best against best: {r.floor_ms / r.ms_per_token:.0%})")
    if r.kv_utilisation is not None:
        console.print(f"KV-cache utilisation (tokens stored / token slots allocated): {r.kv_utilisation:.1%}")
    if r.peer_ms_per_token is not None:
        p = r.peer_ms_per_token
        console.print(f"transformers generate batch-1 decode: {p:.2f} ms/token = {1000 / p:.1f} tok/s, "
                      f"{r.floor_ms / p:.0%} of the floor; lmkernel is {p / r.ms_per_token:.2f}x as fast")


def _bench_against_llama_cpp(model: str, prompt_tokens: int, new_tokens: int, prefill_tokens: int, rounds: int,
                             quantization: str, cpu_path: str = "auto") -> None:
    """`lmk bench latency --peer llama.cpp`: the same GGUF file in lmkernel and in llama.cpp, same threads."""
    from lmkernel.bench.latency import against_llama_cpp
    from lmkernel.bench.machine import cpu_isa, cpu_name
    from lmkernel.layers import cpu_kernels

    try:
        run = against_llama_cpp(model, prompt_tokens, new_tokens, prefill_tokens, rounds, quantization_arg(quantization),
                                cpu_path)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"{model} ({run.path.name}, {run.file_size / 1e6:,.0f} MB) on {cpu_name()} ({cpu_isa()}), "
                  f"{run.threads} threads; medians of {rounds} alternating rounds")
    console.print(f"lmkernel kernels: {cpu_kernels.current_path()} (AMX: {cpu_kernels.amx_status()}); "
                  f"llama.cpp build: {run.peer.build()}")
    console.print(_llama_cpp_table(run, prompt_tokens, prefill_tokens))


def _llama_cpp_table(run: LlamaCppRun, prompt_tokens: int, prefill_tokens: int) -> Table:
    """The llama.cpp comparison side by side: decode, its floor, prompt processing, load time and memory."""
    from lmkernel.bench.llama_cpp_peer import CONTEXT

    r, loads, first_load, file_size = run.comparison, run.loads, run.first_load, run.file_size
    table = Table("", "lmkernel", "llama.cpp", "lmkernel / llama.cpp")
    (ours_ms, peer_ms), (ours_tps, peer_tps) = r.decode_ms, r.prefill_tps
    table.add_row(f"batch-1 decode after {prompt_tokens} tokens", f"{1000 / ours_ms:.1f} tok/s ({ours_ms:.2f} ms)",
                  f"{1000 / peer_ms:.1f} tok/s ({peer_ms:.2f} ms)", f"{r.decode_ratio:.2f}x")
    table.add_row(f"decode against its floor ({r.floor_ms:.2f} ms: weights read a step / read bandwidth)",
                  f"{r.floor_fractions[0]:.0%}", f"{r.floor_fractions[1]:.0%}", "")
    table.add_row(f"prompt processing, {prefill_tokens} tokens", f"{ours_tps:.1f} tok/s", f"{peer_tps:.1f} tok/s",
                  f"{r.prefill_ratio:.2f}x")
    table.add_row("load: file to first token (k-quant layers mapped from the packed cache)", f"{loads[0].seconds:.2f} s",
                  f"{loads[1].seconds:.2f} s", f"{loads[0].seconds / loads[1].seconds:.2f}x the time")
    table.add_row("load the first time (packing, and writing the packed cache)", f"{first_load.seconds:.2f} s",
                  f"{loads[1].seconds:.2f} s", f"{first_load.seconds / loads[1].seconds:.2f}x the time")
    table.add_row(f"resident memory the load adds ({CONTEXT}-token KV cache)", f"{loads[0].resident / 1e6:,.0f} MB ({loads[0].resident / file_size:.2f}x file)",
                  f"{loads[1].resident / 1e6:,.0f} MB ({loads[1].resident / file_size:.2f}x file)", "")
    return table


@bench_app.command("embed")
def bench_embed(
    model: Annotated[str, typer.Option(help="a sentence-transformers folder or an embedding GGUF")] = "all-minilm-l6-v2",
    sentences: Annotated[int, typer.Option(help="PhraseBank validation sentences embedded each round")] = 512,
    rounds: Annotated[int, typer.Option()] = 3,
    threads: Annotated[int, typer.Option(help="threads for both sides")] = 2,
    phrasebank: Annotated[Path | None, typer.Option(
        help="Financial PhraseBank JSON lines (default: the repository's shared/data/financial-phrasebank/valid.jsonl)")] = None,
) -> None:
    """Sentence-embedding throughput against sentence-transformers (a folder) or llama.cpp (a GGUF), same texts,
    same threads, rounds alternating."""
    from lmkernel.bench.embed import embed_speed
    from lmkernel.bench.workload import shared_file
    from lmkernel.loading import load_model

    try:
        path = shared_file("financial-phrasebank/valid.jsonl", "--phrasebank", phrasebank)
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()][:sentences]
        loaded = load_model(model)
        if not loaded.config.is_encoder:
            raise LmkError(f"{model}: the embedding benchmark needs an encoder model")
        r = embed_speed(loaded, texts, rounds, threads)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    console.print(f"{model}: {r.sentences} sentences ({r.tokens} tokens), {threads} threads, median of {rounds} rounds")
    console.print(f"lmkernel {r.ours:.1f} sentences/s; {r.peer} {r.theirs:.1f} sentences/s; lmkernel is "
                  f"{r.ours / r.theirs:.2f}x as fast; lowest cosine between the two sides' embeddings {r.min_cosine:.6f}")


@bench_app.command("speculative")
def bench_speculative(
    model: Annotated[str, typer.Option()] = "qwen2.5-coder-1.5b-instruct",
    proposer: Annotated[list[str] | None, typer.Option(help="ngram and/or draft models (default: ngram and "
                                                              "qwen2.5-coder-0.5b-instruct)")] = None,
    tokens: Annotated[list[int] | None, typer.Option("--k", help="proposed tokens a step (default 2, 4, 6)")] = None,
    edit_prompts: Annotated[int, typer.Option(help="code-editing prompts to run (of 20)")] = 20,
    chat_prompts: Annotated[int, typer.Option(help="ordinary chat prompts to run (of 8)")] = 8,
    max_tokens: Annotated[int, typer.Option()] = 192,
    kv_cache_memory: KVMemory = "1GiB",
    serve: Annotated[bool, typer.Option("--serve", help="instead: the code-editing prompts through `lmk serve` with "
                                                        "and without speculation, streaming clients")] = False,
    concurrency: Annotated[list[int] | None, typer.Option(help="with --serve: streaming clients (default 1, 8)")] = None,
) -> None:
    """Speculative decoding (prompt lookup, a draft model; several proposal lengths) against plain decoding at
    batch 1, greedy, on code-editing and chat prompts: decode speed, acceptance, tokens per checking forward,
    and whether every output equals the plain one token for token. With --serve, through the server."""
    from lmkernel.bench.speculative import CHAT_PROMPTS, EDIT_PROMPTS, compare
    from lmkernel.layers import cpu_kernels
    from lmkernel.loading import load_model

    proposers = proposer or ["ngram", "qwen2.5-coder-0.5b-instruct"]
    settings = [(p, k) for p in proposers for k in (tokens or [2, 4, 6])]
    workloads = {"code editing": EDIT_PROMPTS[:edit_prompts], "chat": CHAT_PROMPTS[:chat_prompts]}
    if serve:
        return _speculative_serve(model, settings, EDIT_PROMPTS[:edit_prompts], concurrency or [1, 8], max_tokens,
                                  kv_cache_memory)
    try:
        results = compare(load_model(model), settings, {k: v for k, v in workloads.items() if v}, max_tokens,
                          kv_cache_memory)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    import torch

    drafts = sorted({p for p in proposers if p != "ngram"})
    console.print(f"{model}, batch 1, greedy, {torch.get_num_threads()} threads, CPU kernels {cpu_kernels.current_path()}"
                  f"{'; draft model ' + ', '.join(drafts) if drafts else ''}; decode speed from each request's first "
                  "token to its last; every setting runs each prompt in turn")
    for name, runs in results.items():
        plain = runs[0]
        table = Table("setting", "decode tok/s", "vs plain", "acceptance", "tokens / check", "same tokens as plain",
                      title=f"{name}: {len(plain.outputs)} prompts, {plain.tokens} tokens")
        for r in runs:
            same = sum(a == b for a, b in zip(r.outputs, plain.outputs))
            table.add_row(r.label, f"{r.tok_s:.1f}", f"{r.tok_s / plain.tok_s:.2f}x",
                          "" if r is plain else f"{r.acceptance:.0%}", "" if r is plain else f"{r.tokens_per_check:.2f}",
                          f"{same} of {len(plain.outputs)}")
        console.print(table)


def _speculative_serve(model: str, settings: list[tuple[str, int]], texts: list[str], levels: list[int],
                       max_tokens: int, kv_cache_memory: str) -> None:
    """`lmk bench speculative --serve`: each setting's server under streaming clients at each level, against plain."""
    import tempfile

    from lmkernel.bench.speculative import serve_compare
    from lmkernel.loading import load_model

    try:
        tokenizer = load_model(model).tokenizer  # mapped, not read: the server loads the model itself
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                 tokenize=True) for t in texts]
        results = serve_compare(model, settings, prompts, levels, max_tokens, kv_cache_memory,
                                Path(tempfile.mkdtemp(prefix="lmk-bench-spec-")))
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    table = Table("setting", "clients", "out tok/s", "vs plain", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
                  title=f"{model} through lmk serve: {len(prompts)} code-editing prompts, up to {max_tokens} tokens each")
    for label, by_level in results.items():
        for c, r in by_level.items():
            base = results["plain"][c].tokens_per_second
            table.add_row(label, str(c), f"{r.tokens_per_second:.1f}", f"{r.tokens_per_second / base:.2f}x",
                          f"{r.percentile('ttft', 50):.0f}", f"{r.percentile('itl', 50):.0f}", f"{r.percentile('itl', 99):.0f}")
    console.print(table)


@bench_app.command("deterministic")
def bench_deterministic(
    model: Annotated[str, typer.Option()] = "qwen2.5-coder-1.5b-instruct",
    prompts: Annotated[int, typer.Option(help="measured prompts (of 20)")] = 20,
    max_tokens: Annotated[int, typer.Option()] = 32,
    batch: Annotated[list[int] | None, typer.Option(help="decode batch sizes to time (default 1, 8, 32)")] = None,
    rounds: Annotated[int, typer.Option(help="rounds of the cost measurement (the best kept)")] = 3,
    kv_cache_memory: KVMemory = "1GiB",
) -> None:
    """--deterministic against the default: the same prompts alone, in a batch of 32, chunked 16 tokens a step
    and after a prefix-cache hit (identical tokens and log-probs?), and the cost per prompt token and per decode
    step, both modes measured in turn in one process."""
    from lmkernel.bench.deterministic import LONG_PROMPT, MEASURED_PROMPTS, cost, invariance
    from lmkernel.layers import cpu_kernels
    from lmkernel.loading import load_model

    if not 1 <= prompts <= len(MEASURED_PROMPTS):
        raise fail(LmkError(f"--prompts must be 1 to {len(MEASURED_PROMPTS)}; got {prompts}"))
    for flag, value in (("--max-tokens", max_tokens), ("--batch", min(batch or [1])), ("--rounds", rounds)):
        if value < 1:
            raise fail(LmkError(f"{flag} must be at least 1; got {value}"))
    try:
        loaded = load_model(model)
        found = [invariance(loaded, MEASURED_PROMPTS[:prompts], max_tokens, kv_cache_memory, d) for d in (False, True)]
        spent = cost(loaded, LONG_PROMPT, batch or [1, 8, 32], 16, rounds, kv_cache_memory)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    import torch

    console.print(f"{model}, greedy, {max_tokens} tokens, {torch.get_num_threads()} threads, CPU kernels "
                  f"{cpu_kernels.current_path()}")
    table = Table("mode", "condition", "same tokens as alone", "same tokens and log-probs",
                  title=f"{found[0].prompts} prompts, each compared with its answer alone")
    for r in found:
        for condition in r.same_tokens:
            table.add_row(r.mode, condition, f"{r.same_tokens[condition]} of {r.prompts}",
                          f"{r.same_logprobs[condition]} of {r.prompts}")
    console.print(table)
    table = Table("measure", "default ms", "deterministic ms", "cost", title="cost (best of each mode's rounds)")
    table.add_row(f"prompt processing, per token ({spent.prompt_tokens}-token prompt)",
                  f"{spent.prompt_seconds['default'] * 1e3:.2f}", f"{spent.prompt_seconds['deterministic'] * 1e3:.2f}",
                  f"{spent.prompt_seconds['deterministic'] / spent.prompt_seconds['default']:.2f}x")
    for b, base in spent.step_seconds["default"].items():
        det = spent.step_seconds["deterministic"][b]
        table.add_row(f"decode step, {b} sequences", f"{base * 1e3:.1f}", f"{det * 1e3:.1f}", f"{det / base:.2f}x")
    console.print(table)
