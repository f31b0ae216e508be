"""`lmk bench ...`: lmkernel against a peer or the hardware limit, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lmkernel.cli import Device, Dtype, KVMemory, Opt, Quantization, app, console, fail, quantization_arg
from lmkernel.errors import LmkError
from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.registry import resolve

if TYPE_CHECKING:
    from lmkernel.bench.workload import Workload
    from lmkernel.loading import LoadedModel

MonitorDefaults = MonitorConfig()

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
    cpu_path: Annotated[str, typer.Option(help="lmkernel's CPU kernels: auto, amx, avx512-vnni, avx512 or avx2 "
                                               "(a narrower path forced on a wider CPU)")] = "auto",
) -> None:
    """Batch-1 decode ms/token against the floor of weight bytes / read bandwidth measured in this run, and
    against a peer on the same model in the same run."""
    from lmkernel.bench.latency import measure
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM

    if peer not in ("transformers", "llama.cpp", "none"):
        raise fail(LmkError(f"--peer must be transformers, llama.cpp or none; got '{peer}'"))
    if peer == "llama.cpp":
        return _bench_against_llama_cpp(model, prompt_tokens, new_tokens, prefill_tokens, rounds, quantization_arg(quantization),
                                        cpu_path)
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
                             quantization: str | None, cpu_path: str = "auto") -> None:
    """`lmk bench latency --peer llama.cpp`: the same GGUF file in lmkernel and in llama.cpp, same threads."""
    import torch

    from lmkernel.bench.latency import compare_llama_cpp
    from lmkernel.bench.llama_cpp_peer import CONTEXT, LlamaCppPeer, load_script
    from lmkernel.layers import cpu_kernels
    from lmkernel.bench.load import best_of, lmkernel_loads
    from lmkernel.bench.workload import text_workload
    from lmkernel.engine.llm import LLM

    threads = torch.get_num_threads()
    try:
        source = resolve(model)
        if source.kind != "gguf":
            raise LmkError(f"{model}: llama.cpp runs GGUF files; this is a {source.kind}")
        file_size = source.path.stat().st_size
        first_load, later_load = lmkernel_loads(model, threads, CONTEXT, cpu_path, 3)
        loads = [later_load, best_of(load_script(source.path, threads), "llama.cpp's load", 3)]
        llm = LLM(model, kv_cache_memory="256MiB", verbose=False, enable_prefix_caching=False, quantization=quantization,
                  cpu_path=cpu_path)
        texts = text_workload(llm.tokenizer, 2, (max(prompt_tokens, prefill_tokens),) * 2, (1, 1)).prompts
        other = LlamaCppPeer(source.path, threads)
        r = compare_llama_cpp(llm, other, texts[0][:prompt_tokens], texts[1][:prefill_tokens], new_tokens, rounds)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    flags = Path("/proc/cpuinfo").read_text()
    isa = ("AVX-512 VNNI, AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2")
    console.print(f"{model} ({source.path.name}, {file_size / 1e6:,.0f} MB) on {cpu} ({isa}), {threads} threads; "
                  f"medians of {rounds} alternating rounds")
    console.print(f"lmkernel kernels: {cpu_kernels.current_path()} (AMX: {cpu_kernels.amx_status()}); "
                  f"llama.cpp build: {other.build()}")
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
    console.print(table)


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
    phrasebank = SHARED_DATA / "financial-phrasebank"
    train = root / "train.jsonl"
    valid = root / "valid.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    train.write_text("".join((phrasebank / "train.jsonl").read_text().splitlines(keepends=True)[:32]))
    valid.write_text("".join((phrasebank / "valid.jsonl").read_text().splitlines(keepends=True)[:16]))
    tune_config = (f"task: classify\nmodel: all-minilm-l6-v2\ndata: {train}\nholdout: 0.25\noutput: OUTPUT\nmax_steps: 2\n"
                   "eval_every: 1\nwarmup: 0\ncheckpointing: false\nlora: r=4,alpha=8\nsearch:\n  lr: [0.0001, 0.001]\n"
                   "  batch_size: [8]\n  epochs: [1, 1]\n  warmup: [0, 0]\n  lora_r: [2, 4]\n")
    cases = {"batch": crash.batch_case, "train": lambda: crash.train_case(train, valid), "quantize": crash.quantize_case,
             "pull": crash.pull_case, "recommend": crash.recommend_case, "tune": lambda: crash.tune_case(tune_config)}
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

    from lmkernel.bench.serve import run_http, run_in_process, start_server_process
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


def _serve_against_llama_server(model: str, loaded: LoadedModel, works: dict[int, Workload], kv_cache_memory: str, device: str,
                                peer_binary: Path | None, cmake_args: str | None, prompts: tuple[int, int],
                                output_tokens: int) -> None:
    """`lmk bench serve --peer llama-server`: each level against `lmk serve`, then against a llama-server with
    one slot per stream (continuous batching, same threads); the step breakdown at the level nearest 8."""
    import tempfile
    import time

    import torch

    from lmkernel.bench.llama_server_peer import CONTEXT_PER_SLOT, build_llama_server, default_cmake_flags, start_llama_server
    from lmkernel.bench.processes import free_port
    from lmkernel.bench.serve import breakdown, decode_limits, engine_counters, run_http, start_server_process
    from lmkernel.layers import cpu_kernels

    threads = torch.get_num_threads()
    if peer_binary is not None and not peer_binary.is_file():
        raise LmkError(f"--peer-binary {peer_binary}: no such file")
    binary = peer_binary or build_llama_server(cmake_args, jobs=threads, log=console.print)
    build = "given with --peer-binary" if peer_binary else f"built with {cmake_args or default_cmake_flags()}"
    logs = Path(tempfile.mkdtemp(prefix="lmk-bench-serve-"))
    warm = works.pop(0)
    levels = sorted(works)
    watched = min(levels, key=lambda c: abs(c - 8))
    ours, theirs, phases = {}, {}, {}
    server = start_server_process([model, "--kv-cache-memory", kv_cache_memory, "--device", device, "--threads",
                                   str(threads), "--max-num-seqs", str(max(max(levels), 16))], logs / "lmk.log")
    try:
        for c in levels:
            run_http(server, model, warm, 2)  # prompts of their own, so nothing measured is cached
            before, start = engine_counters(server), time.perf_counter()
            ours[c] = run_http(server, model, works[c], c)
            phases[c] = breakdown(before, engine_counters(server), time.perf_counter() - start)
            peer = start_llama_server(binary, loaded.source.path, threads, c, free_port(), logs / f"llama-server-{c}.log")
            try:
                run_http(peer, model, warm, 2)
                theirs[c] = run_http(peer, model, works[c], c)
            finally:
                peer.stop()
    finally:
        server.stop()
    p = phases[watched]
    batch = max(1, round(p["lmkernel_engine_tokens:decode"] / max(p["lmkernel_engine_steps:decode"], 1)))
    mean_context = round(sum(map(len, works[watched].prompts)) / len(works[watched].prompts) + output_tokens / 2)
    limits = decode_limits(loaded, batch, mean_context)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    console.print(f"{model} ({loaded.source.path.name}) on {cpu}, {threads} threads; prompts {prompts[0]}-{prompts[1]} "
                  f"tokens (distinct), {output_tokens} tokens each (ignore_eos), each client sends its next request "
                  f"when the last ends")
    console.print(f"lmkernel kernels: {cpu_kernels.current_path()}; llama-server {binary}, {build}; -t {threads} -tb "
                  f"{threads} -np STREAMS -c {CONTEXT_PER_SLOT}*STREAMS -cb")
    table = Table("streams", "requests", "lmk serve tok/s", "llama-server tok/s", "ratio", "TTFT p50 s (lmk / llama)",
                  "TTFT p99 s", "ITL p50 ms", "ITL p99 ms")
    for c in levels:
        a, b = ours[c], theirs[c]
        table.add_row(str(c), str(a.requests), f"{a.tokens_per_second:.1f}", f"{b.tokens_per_second:.1f}",
                      f"{a.tokens_per_second / b.tokens_per_second:.2f}x",
                      f"{a.percentile('ttft', 50) / 1000:.2f} / {b.percentile('ttft', 50) / 1000:.2f}",
                      f"{a.percentile('ttft', 99) / 1000:.2f} / {b.percentile('ttft', 99) / 1000:.2f}",
                      f"{a.percentile('itl', 50):.0f} / {b.percentile('itl', 50):.0f}",
                      f"{a.percentile('itl', 99):.0f} / {b.percentile('itl', 99):.0f}")
    console.print(table)
    wall = ours[watched].seconds
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
    console.print(split)
    console.print(f"limits measured in this run: read bandwidth {limits.bandwidth_gbs:.1f} GB/s, int8 peak "
                  f"{limits.peak_tmacs:.2f} T multiply-adds/s on {limits.units}")


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
    from lmkernel.bench.workload import shared_file

    try:
        cusum = replace(MonitorDefaults, shift=shift, threshold=threshold).check()
        replay = None
        if model is not None:
            from lmkernel.engine.llm import LLM

            rows = [json.loads(line) for line in shared_file("financial-phrasebank/valid.jsonl", "--valid-data", valid_data)
                    .read_text(encoding="utf-8").splitlines() if line.strip()]
            llm = LLM(model, device=device)
            if not llm.loaded.config.is_classifier:
                raise LmkError(f"--model {model}: not a classifier (train one with `lmk train --task classify`)")
            predicted = [c.label == cusum.label for c in llm.classify([r["text"] for r in rows])]
            replay = mb.Replay([p for p, r in zip(predicted, rows) if r["label"] == cusum.label],
                               [p for p, r in zip(predicted, rows) if r["label"] != cusum.label])
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    for name, config in mb.configs(cusum):
        table = Table(title=f"{name}: simulated bursts, calm records at {base:.0%}, {streams} streams each")
        for col in ("calm before", "burst records", "share", "median delay", "p90 delay", "detected", "within 20", "false alert before"):
            table.add_column(col, justify="right")
        shapes = [(300, n, p) for n in (20, 40, 60) for p in (0.3, 0.5, 0.8)] + [(100, 60, 0.5), (1000, 60, 0.5)]
        for row in mb.simulated_delays(config, base, shapes, streams):
            table.add_row(*_delay_cells(row))
        console.print(table)
        fa = mb.false_alerts_per_10k(config, lambda rng: rng.random() < base, calm_records, calm_streams)
        console.print(f"{name}: {fa:.2f} false alerts per 10,000 calm records ({calm_streams} streams of {calm_records:,})")
        if replay is None:
            continue
        table = Table(title=f"{name}: replayed PhraseBank predictions of {model}, 300 calm sentences at {base:.0%} "
                            f"{cusum.label}, a burst, 200 calm")
        for col in ("calm before", "burst records", "share", "median delay", "p90 delay", "detected", "within 20",
                    "false alert before"):
            table.add_column(col, justify="right")
        for length, share in ((20, 0.5), (40, 0.5), (60, 0.5), (60, 0.8), (60, 1.0)):
            table.add_row(*_delay_cells(mb.replay_delays(replay, config, base, length, share, min(streams, 100))))
        console.print(table)
        fa = mb.replay_false_alerts(replay, config, base, calm_records, max(1, calm_streams // 5))
        console.print(f"{name}: {fa:.2f} false alerts per 10,000 replayed calm sentences "
                      f"(predicted {cusum.label} share {sum(replay.others) / len(replay.others):.1%} among the others, "
                      f"{sum(replay.watched) / len(replay.watched):.1%} among true {cusum.label})")


def _delay_cells(row) -> list[str]:
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
        if peer != "recbole":
            raise LmkError(f"--peer must be recbole; got {peer!r}")
        chosen = [p for p in peers.split(",") if p]
        unknown = [p for p in chosen + cold_peers.split(",") if p and p not in rb.PEERS]
        if unknown:
            raise LmkError(f"--peers: {', '.join(unknown)} not among {', '.join(rb.PEERS)}")
        if not 0 <= cold_fraction < 0.5:
            raise LmkError(f"--cold-fraction must be in [0, 0.5); got {cold_fraction}")
        inter_path, item_path = movielens_100k()
        items = read_items(item_path)
        data = read_interactions(inter_path, items)
        config = RecommenderConfig(encoder_training=EncoderTraining(steps=encoder_steps, seed=seed), seed=seed)
        root = rb.temp_root()
        runs = [("all items", rb.prepare(data, items, root, "ml100k", 0.0, seed), chosen)]
        if cold_fraction:
            runs.append((f"cold start ({cold_fraction:.0%} of items)",
                         rb.prepare(data, items, root, "ml100kcold", cold_fraction, seed), [p for p in cold_peers.split(",") if p]))
        for title, prepared, models in runs:
            results = [rb.run_ours(prepared, config, root, lambda line: console.print(f"  lmkernel: {line}"))]
            failed = []
            for model in models:
                console.print(f"  running RecBole {model} ...")
                try:
                    results.append(rb.run_peer(model, prepared, peer_timeout))
                except (RuntimeError, subprocess_error()) as exc:
                    failed.append(f"{model}: {exc}")
            table = Table(title=f"MovieLens-100k, {title}: leave-one-out by time, full ranking, @10")
            for col in ("model", "users", "HR@10", "NDCG@10", "MRR@10", "lmkernel NDCG / this", "RecBole's own NDCG@10", "epochs", "time s"):
                table.add_column(col, justify="left" if col == "model" else "right")
            subsets = [("", None)] + ([(" (cold users)", prepared.cold_users)] if prepared.cold_users else [])
            ours_ndcg = {}
            for suffix, users in subsets:
                for r in results:
                    m = rb.score(r["top10"], prepared.targets, users)
                    if r["model"] == "lmkernel":
                        ours_ndcg[suffix] = m["ndcg@10"]
                    own = r.get("test", {}).get("ndcg@10") if not suffix else None
                    ratio = f"{ours_ndcg[suffix] / m['ndcg@10']:.2f}x" if m["ndcg@10"] else "peer 0"
                    table.add_row(r["model"] + suffix, str(m["users"]), f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}",
                                  f"{m['mrr@10']:.4f}", "-" if r["model"] == "lmkernel" else ratio,
                                  "-" if own is None else f"{own:.4f}", str(r.get("epochs") or "-"), f"{r['seconds']:.0f}")
            console.print(table)
            for line in failed:
                console.print(f"[red]not measured[/]: {line}")
    except (LmkError, RuntimeError, ValueError, OSError, subprocess_error()) as exc:
        raise fail(exc) from None


def subprocess_error() -> type[Exception]:
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
