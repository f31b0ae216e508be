"""POST /v1/embeddings: sentence embeddings from the encoder served beside the generation model."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lmkernel.errors import LmkError
from lmkernel.serve.auth import key_hash
from lmkernel.serve.checks import engine_error, inputs, service
from lmkernel.serve.logs import log_request
from lmkernel.serve.protocol import APIError, EmbeddingRequest
from lmkernel.serve.responses import EmbeddingResponse, documented

router = APIRouter()


@router.post("/v1/embeddings", **documented(EmbeddingRequest, EmbeddingResponse))
async def embeddings(request: Request) -> Response:
    svc = service(request)
    key = svc.authenticate(request)
    body = await svc.parse(request, EmbeddingRequest)
    svc.check_model(body.model, "embed")
    embedder = svc.embedder
    if embedder is None:  # check_model answers 404 first when no embedding model is served
        raise APIError(404, "this server has no embedding model", "model", code="model_not_found")
    if body.dimensions is not None and not embedder.matryoshka:
        raise APIError(400, f"model '{body.model}' is not trained to cut its {embedder.dimensions}-dimensional "
                       "embeddings short (not a Matryoshka model); leave 'dimensions' out", "dimensions")
    if body.dimensions is not None and body.dimensions > embedder.dimensions:
        raise APIError(400, f"'dimensions' is {body.dimensions}; model '{body.model}' gives {embedder.dimensions}",
                       "dimensions")
    given = inputs(body.input, "input")
    prefix = ""
    if body.prompt_name is not None:
        if body.prompt_name not in embedder.prompts:
            raise APIError(400, f"'prompt_name' {body.prompt_name!r} is not one of model '{body.model}''s prompts "
                           f"({', '.join(sorted(embedder.prompts)) or 'it has none'})", "prompt_name")
        if not all(isinstance(x, str) for x in given):
            raise APIError(400, "'prompt_name' applies to text inputs; token ids already hold their prompt", "prompt_name")
        prefix = embedder.prompts[body.prompt_name]
    ids = [embedder.tokenizer.encode(prefix + x) if isinstance(x, str) else x for x in given]
    try:
        embedder.check_inputs(ids)
    except (LmkError, ValueError) as exc:
        raise engine_error(exc, "input") from None
    tokens = sum(map(len, ids))
    svc.gate.charge(key, tokens)
    start = time.monotonic()
    try:
        vectors = await embedder.embed(ids, body.dimensions)
    except (LmkError, ValueError) as exc:
        raise engine_error(exc, "input") from None
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
