"""The OpenAI-compatible HTTP API over an `AsyncEngine` (generation) and an encoder (embeddings).

Every failure leaves as an OpenAI error object with a 4xx status; only a fault of lmkernel itself
may answer 500. A client that goes away has its requests aborted at the next engine step. The routes
live one group to a module in `routes/` (completions, chat, embeddings, tokenize, adapters, admin); what
they share (the checks of a request, the served models) is `checks.Service`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema

from lmkernel.engine.async_embedder import AsyncEmbedder
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.serve.checks import Recommends, ServerConfig, ServerState, Service
from lmkernel.serve.metrics import Metrics
from lmkernel.serve.protocol import REQUEST_MODELS, APIError
from lmkernel.serve.routes import adapters, admin, chat, completions, embeddings, recommend, tokenize

__all__ = ["ServerConfig", "ServerState", "build_app"]

log = logging.getLogger("lmkernel.serve")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _Guard:
    """ASGI middleware: refuses new API calls while draining (503) and counts responses by status."""

    def __init__(self, app: Any, state: ServerState, metrics: Metrics) -> None:
        self.app, self.state, self.metrics = app, state, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path.startswith("/v1/") else "other"
        if self.state.draining and path.startswith("/v1/"):
            self.metrics.requests.labels(endpoint, "503").inc()
            await _error_response(APIError(503, "the server is shutting down", code="draining"))(scope, receive, send)
            return
        status = 500
        self.state.in_flight += 1

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.state.in_flight -= 1
            self.metrics.requests.labels(endpoint, str(status)).inc()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the request bodies' schemas (the routes read bodies themselves)."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        spec.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = spec
    return app.openapi_schema


def build_app(config: ServerConfig, engine: AsyncEngine | None, embedder: AsyncEmbedder | None,
              recommender: Recommends | None = None) -> FastAPI:
    """The FastAPI application; `engine` serves completions and chat, `embedder` embeddings, `recommender`
    `/v1/recommend`."""
    app = FastAPI(title="lmkernel", version="0.1.0", docs_url=None, redoc_url=None)
    service = Service(config, engine, embedder, recommender)
    app.state.service = service
    app.state.server = service.state
    app.state.metrics = service.metrics
    app.add_middleware(_Guard, state=service.state, metrics=service.metrics)
    for module in (admin, completions, chat, embeddings, tokenize, adapters, recommend):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(Exception)
    async def on_fault(request: Request, exc: Exception) -> JSONResponse:  # a fault of lmkernel, not of the input
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(404)
    async def on_not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def on_bad_method(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(400, f"method {request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    return app
