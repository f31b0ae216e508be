"""POST /v1/embeddings: sentence embeddings from the encoder served beside the generation model."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lmkernel.errors import LmkError
from lmkernel.serve.auth import key_hash
from lmkernel.serve.checks import inputs, service
from lmkernel.serve.logs import log_request
from lmkernel.serve.protocol import APIError, EmbeddingRequest, EmbeddingResponse, documented

router = APIRouter()


@router.post("/v1/embeddings", **documented(EmbeddingRequest, EmbeddingResponse))
async def embeddings(request: Request) -> Response:
    svc = service(request)
    key = svc.authenticate(request)
    body = await svc.parse(request, EmbeddingRequest)
    svc.check_model(body.model, "embed")
    embedder = svc.embedder
    assert embedder is not None
    if body.dimensions is not None:
        raise APIError(400, f"model '{body.model}' cannot truncate its {embedder.config.hidden_size}-dimensional "
                       "embeddings; leave 'dimensions' out", "dimensions")
    ids = [embedder.tokenizer.encode(x) if isinstance(x, str) else x for x in inputs(body.input, "input")]
    limit = embedder.max_input_tokens
    for i, x in enumerate(ids):
        if not x:
            raise APIError(400, f"input[{i}] is empty", "input")
        if len(x) > limit:
            raise APIError(400, f"input[{i}] has {len(x)} tokens; this model takes at most {limit}", "input",
                           "context_length_exceeded")
    tokens = sum(map(len, ids))
    svc.gate.charge(key, tokens)
    start = time.monotonic()
    try:
        vectors = await asyncio.to_thread(embedder.embed_token_ids, ids)
    except LmkError as exc:
        raise APIError(400, str(exc), "input") from None
    data = []
    for i, v in enumerate(vectors.numpy()):
        value: Any = base64.b64encode(v.astype(np.float32).tobytes()).decode() if body.encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    svc.metrics.prompt_tokens.inc(tokens)
    svc.metrics.e2e.observe(time.monotonic() - start)
    log_request({"id": uuid.uuid4().hex, "endpoint": "embeddings", "key": key_hash(key), "model": body.model,
                 "status": 200, "prompt_tokens": tokens, "e2e_s": round(time.monotonic() - start, 4)})
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
