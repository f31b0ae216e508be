"""What the in-process route tests share: an app over the real SmolLM2 served as MODEL (an engine of its own
per app, since its step loop runs on the app's event loop), the reference greedy outputs, and readers of
error bodies and server-sent events."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmkernel.config import EngineConfig
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.serve.app import ServerConfig, build_app
from lmkernel.serve.protocol import APIError

MODEL = "m"


@pytest.fixture(scope="session")
def app_client(smollm) -> Callable[..., TestClient]:
    """Makes a TestClient (use it as a context manager) over a fresh app; `generation=False` serves no model,
    `embedder` is passed through, the engine's limits are the first keywords, the other keywords the ServerConfig's."""
    def make(max_model_len: int = 64, generation: bool = True, embedder: Any = None, max_loras: int | None = None,
             kv_cache_memory: str = "16MiB", **config: Any) -> TestClient:
        engine = AsyncEngine.build(smollm, EngineConfig(kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                                                        max_loras=max_loras)) if generation else None
        return TestClient(build_app(ServerConfig(model_name=MODEL, **config), engine, embedder))

    return make


@pytest.fixture(scope="session")
def reference(smollm):
    """SmolLM2 in lmkernel's offline LLM: what the routes must answer, computed without the server."""
    from lmkernel import LLM

    return LLM(smollm, kv_cache_memory="16MiB", verbose=False)


def _api_error(response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": APIError.TYPES.get(status, "server_error"), "param": param,
                     "code": code}, error
    return error["message"]


def _sse_events(response) -> list[dict[str, Any]]:
    """The JSON events of a server-sent event stream, checked to be `data: ...` frames ending in `data: [DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    frames = response.text.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]", frames[-3:]
    assert all(f.startswith("data: {") for f in frames[:-2]), frames
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]


@pytest.fixture(scope="session")
def api_error() -> Callable[..., str]:
    """Checks an OpenAI error answer (status, type, the field it names, its code) and returns its message."""
    return _api_error


@pytest.fixture(scope="session")
def sse_events() -> Callable[..., list[dict[str, Any]]]:
    return _sse_events
