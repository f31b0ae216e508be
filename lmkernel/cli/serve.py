"""`lmk serve`: the OpenAI API over HTTP, in one process or on Ray Serve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmkernel.cli import Deterministic, Device, Dtype, Quantization, SpecModel, SpecTokens, app, fail, speculative
from lmkernel.config import EngineConfig
from lmkernel.errors import LmkError


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
    kv_cache_memory: Annotated[str | None, typer.Option("--kv-cache-memory", help="e.g. 512MiB or 2GiB (default: a "
                                                        "fraction of the free memory, --kv-cache-fraction)")] = None,
    kv_cache_fraction: Annotated[float, typer.Option(help="of the free memory, without --kv-cache-memory")] = 0.2,
    block_size: Annotated[int, typer.Option(help="tokens per KV-cache block (a power of two)")] = 16,
    enable_prefix_caching: Annotated[bool, typer.Option(help="reuse the KV blocks of prompts' shared prefixes")] = True,
    hybrid_kv_cache: Annotated[bool, typer.Option(help="sliding-window layers (Gemma 3's local ones, Mistral's) give back "
                                                       "the KV blocks that left their window")] = True,
    max_num_seqs: Annotated[int, typer.Option(help="sequences in one engine step")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="tokens computed in one engine step")] = 2048,
    prefill_tokens_with_decodes: Annotated[int, typer.Option(help="prompt tokens a step carries while other sequences "
                                                                  "decode (bounds their inter-token latency); 0: no "
                                                                  "cap beyond --max-num-batched-tokens")] = 512,
    max_model_len: Annotated[int | None, typer.Option(help="prompt + output tokens of one request (default: the "
                                                            "model's context)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's; with --ray: --replica-cpus)")] = None,
    seed: Annotated[int, typer.Option(help="the sampler's seed for requests without their own")] = 0,
    decode_backend: Annotated[str, typer.Option(help="auto (the fastest that applies), fused, paged-kernel or torch")] = "auto",
    cpu_path: Annotated[str, typer.Option(help="CPU kernels: auto (AMX tiles where granted, else the widest vectors), "
                                               "amx, avx512-vnni, avx512 or avx2")] = "auto",
    packed_cache: Annotated[str, typer.Option(help="where a GGUF's k-quant layers are kept in the decode layout after "
                                                   "a first load, so a restart maps them: auto ($LMK_HOME/packed), a "
                                                   "directory, or off")] = "auto",
    speculative_model: SpecModel = None,
    num_speculative_tokens: SpecTokens = 3,
    deterministic: Deterministic = False,
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
    allow_runtime_lora: Annotated[bool, typer.Option(help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --api-key "
                                                          "and --lora-modules-dir)")] = False,
    lora_modules_dir: Annotated[list[Path] | None, typer.Option(help="with --allow-runtime-lora: a directory adapters may be "
                                                                     "loaded from (symlinks resolved; repeat for more)")] = None,
    max_loras: Annotated[int | None, typer.Option(help="adapters held at once (default: the --lora count; 4 with --allow-runtime-lora); "
                                                       "loading past it drops the least recently used one not in use")] = None,
    recommender: Annotated[Path | None, typer.Option(help="a directory of `lmk recommend fit`, served at POST /v1/recommend")] = None,
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
        from lmkernel.serve.auth import hide_keys_from_process_title, read_keys_file
        from lmkernel.serve.server import LaunchConfig, parse_lora_options, serve as run
        from lmkernel.serve.app import ServerConfig
    except ImportError as exc:
        raise fail(LmkError(f"serving needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)")) from None
    try:
        hide_keys_from_process_title(sys.argv)
        keys = list(api_key or []) + (read_keys_file(api_keys_file) if api_keys_file else [])
        from lmkernel.serve.tool_parsers import PARSERS

        if allow_runtime_lora and not keys:
            raise LmkError("--allow-runtime-lora lets clients load adapter files from this machine: it needs --api-key or --api-keys-file")
        if allow_runtime_lora and not lora_modules_dir:
            raise LmkError("--allow-runtime-lora needs --lora-modules-dir DIR: the directories clients may load adapters from")
        if lora_modules_dir and not allow_runtime_lora:
            raise LmkError("--lora-modules-dir is for --allow-runtime-lora; add it, or leave the directory out")
        for d in lora_modules_dir or []:
            if not d.is_dir():
                raise LmkError(f"--lora-modules-dir {d}: not a directory")
        if max_loras is not None and max_loras < len(lora or []):
            raise LmkError(f"--max-loras must be at least the number of --lora adapters; got {max_loras}")
        slots = max_loras if max_loras is not None else (max(4, len(lora or [])) if allow_runtime_lora else None)
        engine = EngineConfig(
            dtype=dtype, device=device, quantization=quantization, kv_cache_memory=kv_cache_memory,
            kv_cache_fraction=kv_cache_fraction, block_size=block_size, enable_prefix_caching=enable_prefix_caching,
            hybrid_kv_cache=hybrid_kv_cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            prefill_tokens_with_decodes=prefill_tokens_with_decodes or None, threads=threads, seed=seed,
            max_loras=slots, decode_backend=decode_backend, cpu_path=cpu_path, packed_cache=packed_cache,
            speculative=speculative(speculative_model, num_speculative_tokens), deterministic=deterministic,
        )

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
            lora_modules_dirs=[str(d.resolve()) for d in lora_modules_dir or []],
        )
        launch = LaunchConfig(model, embedding_model, engine, host, port, shutdown_grace, parse_lora_options(lora or []))
        if not ray:
            recommends = None
            if recommender is not None:
                try:
                    from lmkernel.apps.recommend_store import Recommender
                except ImportError as exc:
                    raise LmkError(f"--recommender needs the recommend extra: pip install -e '.[recommend]' ({exc.name} is missing)") from None
                recommends = Recommender.load(recommender)
            run(launch, config, recommends)
            return
        if recommender is not None:
            raise LmkError("--recommender is served by a single process; leave out --ray")
        from lmkernel.cluster.ray_serve import ScaleConfig, serve_on_ray

        serve_on_ray(launch, config, ScaleConfig(min_replicas, max_replicas, target_ongoing_requests, upscale_delay,
                                                 downscale_delay, replica_cpus, ray_address, metrics_targets))
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
