"""`lmk batch --ray`: the same batch job on Ray Data, one engine per actor across a cluster.

The requests still to run become a Ray dataset; `map_batches` hands blocks of them to a pool of `--replicas`
actors, each holding the application `lmk serve` would run (loaded once, in the actor) and answering its block
concurrently through it. Results stream back to the driver, which writes them as they arrive, so an interrupted
job resumes like a one-process one.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray

from lmkernel.cluster.batch import BatchRequest, InProcessAPI, ResultWriter, default_models
from lmkernel.errors import LmkError
from lmkernel.serve.checks import ServerConfig
from lmkernel.serve.server import LaunchConfig, load_app


@dataclass(frozen=True)
class RayBatchOptions:
    replicas: int = 2
    replica_cpus: float = 1.0
    ray_address: str | None = None
    block_size: int = 32  # requests handed to an actor at once

    def check(self) -> RayBatchOptions:
        if self.replicas < 1:
            raise LmkError(f"--replicas must be at least 1; got {self.replicas}")
        if not self.replica_cpus > 0:
            raise LmkError(f"--replica-cpus must be positive; got {self.replica_cpus}")
        return self


class BatchActor:
    """One engine: the app loaded once, its own event loop kept across blocks (the engine's loop task lives on it)."""

    def __init__(self, launch: LaunchConfig, config: ServerConfig, concurrency: int) -> None:
        self.app = load_app(launch, config)
        self.loop = asyncio.new_event_loop()
        self.api = InProcessAPI(self.app)
        self.concurrency = concurrency
        self.default_model = default_models(config.model_name, config.embedding_model_name)

    def __call__(self, block: dict[str, Any]) -> dict[str, list[str]]:
        requests = [BatchRequest(**json.loads(r)) for r in block["request"]]

        async def answer() -> list[str]:
            return [json.dumps(line, ensure_ascii=False)
                    async for line in self.api.run(requests, self.concurrency, self.default_model)]

        answers = self.loop.run_until_complete(answer())
        return {"result": answers, "actor": [os.getpid()] * len(answers)}


def start_ray(options: RayBatchOptions) -> bool:
    """Join `--ray-address`, or start a local Ray; True when this process started it."""
    if ray.is_initialized():
        return False
    if options.ray_address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
                 logging_level="WARNING")  # a new local Ray, not one another job started on this machine
        return True
    try:
        ray.init(address=options.ray_address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError) as exc:
        raise LmkError(f"--ray-address {options.ray_address}: Ray could not join that cluster ({exc})") from None
    return False


def run_on_ray(launch: LaunchConfig, config: ServerConfig, requests: list[BatchRequest], writer: ResultWriter,
               concurrency: int, options: RayBatchOptions, on_result: Callable[[dict[str, Any]], None]) -> int:
    """Run the requests on a pool of actors and write each result on the driver as it comes back; returns how
    many actors answered (the seconds include starting the actors and loading their models)."""
    import ray.data

    options.check()
    started = start_ray(options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"request": json.dumps(asdict(r), ensure_ascii=False)} for r in requests]
        blocks = max(options.replicas, -(-len(items) // options.block_size))  # every actor gets work
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        results = dataset.map_batches(
            BatchActor, fn_constructor_args=(launch, config, concurrency), batch_size=-(-len(items) // blocks),
            compute=ray.data.ActorPoolStrategy(size=options.replicas), num_cpus=options.replica_cpus,
            batch_format="numpy")
        actors = set()
        for row in results.iter_rows():
            line = json.loads(row["result"])
            writer.write(line)
            on_result(line)
            actors.add(int(row["actor"]))
        return len(actors)
    finally:
        if started:
            ray.shutdown()
