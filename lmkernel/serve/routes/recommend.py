"""POST /v1/recommend: a user's top k unseen items from the recommender served beside the models."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from lmkernel.errors import LmkError
from lmkernel.serve.auth import key_hash
from lmkernel.serve.checks import service
from lmkernel.serve.logs import log_request
from lmkernel.serve.protocol import APIError, RecommendRequest
from lmkernel.serve.responses import RecommendResponse, documented

router = APIRouter()


@router.post("/v1/recommend", **documented(RecommendRequest, RecommendResponse))
async def recommend(request: Request) -> dict[str, Any]:
    svc = service(request)
    key = svc.authenticate(request)
    body = await svc.parse(request, RecommendRequest)
    if svc.recommender is None:
        raise APIError(404, "no recommender is served; start the server with --recommender DIR")
    svc.gate.charge(key, 1)
    start = time.monotonic()
    try:
        items = await asyncio.to_thread(svc.recommender.query, body.user, body.k, body.time)
    except LmkError as exc:
        raise APIError(404 if "no interactions" in str(exc) else 400, str(exc), "user") from None
    log_request({"id": uuid.uuid4().hex, "endpoint": "recommend", "key": key_hash(key), "status": 200,
                 "items": len(items), "e2e_s": round(time.monotonic() - start, 4)})
    return {"object": "recommendation", "user": body.user, "items": items}
