"""`lmk serve`: the OpenAI API over HTTP, in one process or on Ray Serve."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmkernel.cli import app, fail
from lmkernel.cli.options import config_options
from lmkernel.config import EngineConfig, ServerConfig
from lmkernel.errors import LmkError


RAY = "with --ray: "


@app.command()
@config_options(ServerConfig, "server", build=dict)
@config_options(EngineConfig, "engine", defaults={"prefill_tokens_with_decodes": 512})
def serve(
    engine: EngineConfig,
    server: dict[str, Any],
    model: Annotated[str, typer.Argument(help="the model for completions and chat")] = "smollm2-135m-instruct",
    embedding_model: Annotated[str | None, typer.Option(help="an encoder for /v1/embeddings")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(help="a key clients must send; repeat for more")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="a file of keys, one per line")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the name clients use (default: MODEL)")] = None,
    shutdown_grace: Annotated[float, typer.Option(help="seconds in-flight requests get after SIGTERM")] = 30.0,
    lora: Annotated[list[str] | None, typer.Option("--lora", help="NAME=PATH: serve a PEFT LoRA adapter as MODEL:NAME; "
                                                                  "repeat for more")] = None,
    lora_modules_dir: Annotated[list[Path] | None, typer.Option(help="with --allow-runtime-lora: a directory adapters "
                                                                     "may be loaded from (symlinks resolved; repeat "
                                                                     "for more)")] = None,
    recommender: Annotated[Path | None, typer.Option(help="a directory of `lmk recommend fit`, served at POST "
                                                          "/v1/recommend")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="serve as a Ray Serve deployment with autoscaling replicas")] = False,
    ray_address: Annotated[str | None, typer.Option(help=RAY + "join this cluster ('auto', HOST:PORT, ray://...) "
                                                         "instead of starting a local Ray")] = None,
    min_replicas: Annotated[int, typer.Option(help=RAY + "replicas kept when idle")] = 1,
    max_replicas: Annotated[int, typer.Option(help=RAY + "replicas the autoscaler may add up to")] = 1,
    target_ongoing_requests: Annotated[float, typer.Option(help=RAY + "requests in flight per replica to scale "
                                                                "towards")] = 8.0,
    upscale_delay: Annotated[float, typer.Option(help=RAY + "seconds of high load before adding a replica")] = 5.0,
    downscale_delay: Annotated[float, typer.Option(help=RAY + "seconds of low load before removing a replica")] = 60.0,
    replica_cpus: Annotated[float, typer.Option(help=RAY + "CPUs (and torch threads) per replica")] = 1.0,
    metrics_targets: Annotated[str | None, typer.Option(help=RAY + "keep this Prometheus file_sd JSON listing each "
                                                             "replica's /metrics address")] = None,
) -> None:
    """Serve the OpenAI API (completions, chat, embeddings) over HTTP, in one process or on Ray Serve."""
    try:
        from lmkernel.serve.auth import hide_keys_from_process_title, read_keys_file
        from lmkernel.serve.server import LaunchConfig, parse_lora_options, serve as run
    except ImportError as exc:
        raise fail(LmkError(f"serving needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)")) from None
    try:
        hide_keys_from_process_title(sys.argv)
        keys = list(api_key or []) + (read_keys_file(api_keys_file) if api_keys_file else [])
        for d in lora_modules_dir or []:
            if not d.is_dir():
                raise LmkError(f"--lora-modules-dir {d}: not a directory")
        config = ServerConfig(**server, model_name=served_model_name or model, embedding_model_name=embedding_model,
                              api_keys=keys, lora_modules_dirs=[str(d.resolve()) for d in lora_modules_dir or []])
        engine = _adapter_slots(engine, len(lora or []), config.allow_runtime_lora)
        launch = LaunchConfig(model, embedding_model, engine, host, port, shutdown_grace, parse_lora_options(lora or []))
        if not ray:
            run(launch, config, _recommender(recommender))
            return
        if recommender is not None:
            raise LmkError("--recommender is served by a single process; leave out --ray")
        from lmkernel.cluster.ray_serve import ScaleConfig, serve_on_ray

        serve_on_ray(launch, config, ScaleConfig(min_replicas, max_replicas, target_ongoing_requests, upscale_delay,
                                                 downscale_delay, replica_cpus, ray_address, metrics_targets))
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None


def _adapter_slots(engine: EngineConfig, adapters: int, runtime: bool) -> EngineConfig:
    """--max-loras checked against the --lora count; unset, it is that count (at least 4 with runtime loading)."""
    if engine.max_loras is not None and engine.max_loras < adapters:
        raise LmkError(f"--max-loras must be at least the number of --lora adapters; got {engine.max_loras}")
    if engine.max_loras is None and runtime:
        return dataclasses.replace(engine, max_loras=max(4, adapters))
    return engine


def _recommender(path: Path | None) -> Any:
    """The recommender `--recommender` names, loaded (None without one)."""
    if path is None:
        return None
    try:
        from lmkernel.apps.recommend_store import Recommender
    except ImportError as exc:
        raise LmkError(f"--recommender needs the recommend extra: pip install -e '.[recommend]' ({exc.name} is "
                       "missing)") from None
    return Recommender.load(path)
