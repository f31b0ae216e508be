"""Running the server process: load the models, start uvicorn, drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from fastapi import FastAPI

from lmkernel.config import EngineConfig
from lmkernel.engine.async_embedder import AsyncEmbedder
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.llm import startup_line
from lmkernel.errors import LmkError
from lmkernel.loading import load_model
from lmkernel.serve.app import ServerConfig, ServerState, build_app
from lmkernel.serve.checks import Recommends


@dataclass
class LaunchConfig:
    """Which models to load, the engine to run the decoder on, and where to listen."""

    model: str | None
    embedding_model: str | None
    engine: EngineConfig = field(default_factory=EngineConfig)  # also how the embedding model loads (dtype, device)
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_grace: float = 30.0
    lora: dict[str, str] = field(default_factory=dict)  # adapter name -> PEFT LoRA directory, served as MODEL:NAME


def parse_lora_options(specs: list[str]) -> dict[str, str]:
    """`--lora NAME=PATH` options as {name: path}; each adapter is served as MODEL:NAME."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = (s.strip() for s in spec.partition("="))
        if not sep or not name or not path or ":" in name:
            raise LmkError(f"--lora '{spec}': expected NAME=PATH, with a name without ':' (served as MODEL:NAME)")
        if name in out:
            raise LmkError(f"--lora '{spec}': the name '{name}' is given twice")
        out[name] = path
    return out


class _DrainingServer(uvicorn.Server):
    """On SIGTERM: refuse new API calls (503), wait for those in flight up to the grace period, then exit.

    A second SIGTERM, or SIGINT, stops at once as uvicorn normally does.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float) -> None:
        super().__init__(config)
        self.state, self.grace = state, grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining:
            self.state.draining = True
            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        logging.getLogger("lmkernel.serve").info(
            '{"event": "shutdown", "unfinished_requests": %d}', self.state.in_flight
        )
        self.should_exit = True


def setup_logging() -> None:
    """Request and server log lines (JSON) to standard error, once per process."""
    requests_log = logging.getLogger("lmkernel.requests")
    if not requests_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        for name in ("lmkernel.requests", "lmkernel.serve"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)


def load_app(launch: LaunchConfig, config: ServerConfig, recommender: Recommends | None = None) -> FastAPI:
    """Load the models `launch` names and build the app over them (one process, or one Ray replica)."""
    engine = embedder = None
    c = launch.engine
    if launch.model is not None:
        loaded = load_model(launch.model, dtype=c.dtype, device=c.device, quantization=c.quantization)
        engine = AsyncEngine.build(loaded, c, launch.lora, owned=True)  # refuses an encoder, saying what to do
        print(f"lmkernel: {startup_line(engine.stats())}", flush=True)
    if launch.embedding_model is not None:
        embedder = AsyncEmbedder(load_model(launch.embedding_model, dtype=c.dtype, device=c.device))  # refuses a decoder
    return build_app(config, engine, embedder, recommender)


def serve(launch: LaunchConfig, config: ServerConfig, recommender: Recommends | None = None) -> None:
    """Load, listen and block until shut down."""
    setup_logging()
    app = load_app(launch, config, recommender)
    uv = uvicorn.Config(app, host=launch.host, port=launch.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=1, h11_max_incomplete_event_size=16 * 1024)  # README's limits table
    server = _DrainingServer(uv, app.state.server, launch.shutdown_grace)
    print(f"lmkernel: serving {served_names(config)} on http://{launch.host}:{launch.port}", flush=True)
    server.run()


def served_names(config: ServerConfig) -> str:
    return ", ".join(n for n in (config.model_name, config.embedding_model_name) if n)
