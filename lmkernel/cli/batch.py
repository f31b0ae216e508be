"""`lmk batch`: an OpenAI Batch API file run offline, in this process or on Ray Data."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmkernel.cli import Opt, app, err_console, fail
from lmkernel.cli.options import config_options, option
from lmkernel.config import EngineConfig, ServerConfig
from lmkernel.errors import LmkError

if TYPE_CHECKING:
    from lmkernel.cluster.batch import BatchRequest
    from lmkernel.cluster.ray_batch import RayBatchOptions
    from lmkernel.serve.server import LaunchConfig

ToolCallParser = option(ServerConfig, "tool_call_parser")


@app.command()
@config_options(EngineConfig, "engine")
def batch(
    engine: EngineConfig,
    input: Annotated[Path, typer.Argument(help="JSON lines in the OpenAI Batch API format (custom_id, method, url, body)")],
    output: Annotated[Path, Opt("--output", "-o", help="result lines in OpenAI's output format; a rerun skips those already there")],
    model: Annotated[str, Opt(help="the model for /v1/chat/completions and /v1/completions")] = "smollm2-135m-instruct",
    embedding_model: Annotated[str | None, Opt(help="an encoder for /v1/embeddings lines")] = None,
    served_model_name: Annotated[str | None, Opt(help="the name bodies use for the model (default: MODEL); a body without "
                                                      "\"model\" gets it")] = None,
    concurrency: Annotated[int, Opt(help="requests in flight at once (per replica with --ray); the engine batches them")] = 64,
    tool_call_parser: ToolCallParser = None,
    lora: Annotated[list[str] | None, Opt("--lora", help="NAME=PATH: a PEFT LoRA adapter bodies name as MODEL:NAME")] = None,
    ray: Annotated[bool, Opt("--ray", help="run on Ray Data, one engine per actor")] = False,
    ray_address: Annotated[str | None, Opt(help="with --ray: join this cluster instead of starting a local Ray")] = None,
    replicas: Annotated[int, Opt(help="with --ray: actors, each with its own engine")] = 2,
    replica_cpus: Annotated[float, Opt(help="with --ray: CPUs (and torch threads) per actor")] = 1.0,
) -> None:
    """Run a batch file through the engine offline: one result line per request, errors as per-line error objects."""
    try:
        from lmkernel.cluster.batch import read_requests, written_ids
        from lmkernel.serve.server import LaunchConfig, parse_lora_options
    except ImportError as exc:
        raise fail(LmkError(f"lmk batch needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)")) from None
    try:
        if concurrency < 1:
            raise LmkError(f"--concurrency must be at least 1; got {concurrency}")
        if output.resolve() == input.resolve():
            raise LmkError(f"--output {output}: the same file as the input")
        done = written_ids(output)
        requests, bad_lines = read_requests(input, done)
        if ray and engine.threads is None:
            engine = dataclasses.replace(engine, threads=max(1, int(replica_cpus)))
        wants_embeddings = any(r.url == "/v1/embeddings" for r in requests)
        if wants_embeddings and embedding_model is None:
            raise LmkError(f"{input}: has /v1/embeddings lines; give --embedding-model (an encoder such as all-minilm-l6-v2)")
        wants_generation = any(r.url != "/v1/embeddings" for r in requests)
        name = served_model_name or model
        config = ServerConfig(model_name=name, embedding_model_name=embedding_model,
                              max_queued_requests=max(256, concurrency), tool_call_parser=tool_call_parser)
        launch = LaunchConfig(model if wants_generation else None, embedding_model if wants_embeddings else None, engine,
                              lora=parse_lora_options(lora or []))
        ray_options = None
        if ray:  # the actors load the models; a name that cannot load is said here, not as a remote traceback
            from lmkernel.cluster.ray_batch import RayBatchOptions
            from lmkernel.registry import resolve

            for name_or_path in (launch.model, launch.embedding_model):
                if name_or_path is not None:
                    resolve(name_or_path)
            ray_options = RayBatchOptions(replicas, replica_cpus, ray_address)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    _run(launch, config, requests, bad_lines, output, len(done), concurrency, ray_options)


def _run(launch: LaunchConfig, config: ServerConfig, requests: list[BatchRequest], bad_lines: list[dict], output: Path,
         already: int, concurrency: int, ray: RayBatchOptions | None) -> None:
    """Answer every line (in this process, or on Ray Data's actors), with a progress bar and a closing summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lmkernel.cluster.batch import ResultWriter, default_models, run_local
    from lmkernel.serve.server import load_app

    total = len(requests) + len(bad_lines)
    err_console.print(f"lmk batch: {total} lines to run, {already} already in {output}", highlight=False)
    if total == 0:
        return
    writer = ResultWriter(output)
    failed = completion_tokens = 0
    seconds = 0.0
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=False) as progress:
        task = progress.add_task("requests", total=total)

        def on_result(line: dict) -> None:
            nonlocal failed, completion_tokens
            response = line.get("response")
            failed += line.get("error") is not None or (response is not None and response["status_code"] >= 400)
            usage = (response or {}).get("body", {}).get("usage") or {}
            completion_tokens += usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
            progress.advance(task)

        try:
            for line in bad_lines:
                writer.write(line)
                on_result(line)
            if ray is not None:
                from lmkernel.cluster.ray_batch import run_on_ray

                start = time.perf_counter()
                actors = run_on_ray(launch, config, requests, writer, concurrency, ray, on_result)
                seconds = time.perf_counter() - start
                err_console.print(f"lmk batch: answered by {actors} Ray actors", highlight=False)
            else:
                seconds = run_local(load_app(launch, config), requests, writer, concurrency,
                                    default_models(config.model_name, config.embedding_model_name), on_result)
        except (LmkError, ValueError, OSError) as exc:
            raise fail(exc) from None
        finally:
            writer.close()
    err_console.print(f"lmk batch: wrote {writer.count} results to {output} ({failed} with an error) in {seconds:.1f} s, "
                      f"{completion_tokens / max(seconds, 1e-9):.1f} completion tokens/s", highlight=False)
