"""The server about itself: GET /health, /ready, /metrics (Prometheus) and /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lmkernel.serve.checks import service
from lmkernel.serve.protocol import APIError
from lmkernel.serve.responses import ModelList, documented

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    svc = service(request)
    if svc.state.draining:
        err = APIError(503, "the server is shutting down", code="draining")
        return JSONResponse(err.body(), status_code=err.status)
    return JSONResponse({"status": "ready", "models": svc.served()})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(service(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", **documented(None, ModelList))
async def models(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.authenticate(request)
    adapters, embedder = svc.adapters(), svc.embedder
    extra: dict[str, dict[str, Any]] = {n: {"parent": svc.config.model_name} for n in adapters}
    if embedder is not None and svc.config.embedding_model_name:
        extra[svc.config.embedding_model_name] = {"prompts": sorted(embedder.prompts), "dimensions": embedder.dimensions,
                                                  "matryoshka": embedder.matryoshka}
    return {"object": "list", "data": [{"id": n, "object": "model", "created": svc.created, "owned_by": "lmkernel",
                                        **extra.get(n, {})} for n in svc.served()]}
