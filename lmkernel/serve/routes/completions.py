"""POST /v1/completions: text completion of one or several prompts (texts or token ids), streamed or not."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lmkernel.engine.request import PositionLogprobs, RequestOutput
from lmkernel.serve.checks import Service, inputs, sampling, service
from lmkernel.serve.generation import Generation, top
from lmkernel.serve.protocol import APIError, CompletionRequest
from lmkernel.serve.responses import CompletionResponse, documented

router = APIRouter()


def _prompts(svc: Service, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
    items = inputs(body.prompt, "prompt")
    tok = svc.tokenizer
    ids = [tok.encode(x) if isinstance(x, str) else list(x) for x in items]
    if any(not x for x in ids):
        raise APIError(400, "every prompt needs at least one token", "prompt")
    return ids, [x if isinstance(x, str) else None for x in items]


def _logprobs(svc: Service, out: RequestOutput, j: int, n: int, echo: bool, start_token: int) -> dict[str, Any]:
    """OpenAI's completion logprobs: tokens, their logprobs, the top n at each, and text offsets."""
    sample = out.outputs[j]
    positions: list[tuple[int, PositionLogprobs | None]] = []
    if echo:
        positions += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
    positions += list(zip(sample.token_ids, sample.logprobs or []))[start_token:]
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for token, position in positions:
        text = position[token].decoded_token if position and token in position else None
        text = text if text is not None else svc.tokenizer.decode([token])
        tokens.append(text)
        lps.append(position[token].logprob if position and token in position else None)
        tops.append({t: lp for _, lp, t in top(position, n)} if position else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions", **documented(CompletionRequest, CompletionResponse))
async def completions(request: Request) -> Response:
    svc = service(request)
    key = svc.authenticate(request)
    body = await svc.parse(request, CompletionRequest)
    adapter = svc.check_model(body.model, "generate")
    prompts, texts = _prompts(svc, body)
    params, constrained_by = sampling(body, body.max_tokens, body.logprobs)
    echoed = body.logprobs if body.echo and body.logprobs is not None else None
    params = dataclasses.replace(params, lora=adapter, prompt_logprobs=echoed)
    gen = Generation(svc, "completions", key, svc.admit(key, prompts, params, "prompt"), texts, constrained_by)
    n = body.n
    base = {"id": f"cmpl-{gen.id}", "object": "text_completion", "created": int(time.time()), "model": body.model}
    prompt_texts = [t if t is not None else svc.tokenizer.decode(p) for t, p in zip(texts, prompts)]

    if body.stream:
        sent: dict[tuple[int, int], int] = {}  # (prompt, sample) -> tokens already sent

        def chunks(i: int, out: RequestOutput) -> list[dict[str, Any]]:
            result = []
            for j, o in enumerate(out.outputs):
                done_tokens = sent.get((i, j), 0)
                first = (i, j) not in sent
                if not (o.delta_text or o.finish_reason or (first and body.echo)):
                    continue
                text = (prompt_texts[i] if first and body.echo else "") + o.delta_text
                lp = None
                if body.logprobs is not None:
                    lp = _logprobs(svc, out, j, body.logprobs, first and body.echo, done_tokens)
                sent[(i, j)] = len(o.token_ids)
                result.append({**base, "choices": [{"index": i * n + j, "text": text, "logprobs": lp,
                                                    "finish_reason": o.finish_reason}]})
            return result

        return gen.stream(chunks, [], bool(body.stream_options and body.stream_options.include_usage), base)

    await gen.collect(request)
    choices = []
    for i, out in enumerate(gen.final):
        if out is None:  # collect() returns only once every prompt finished
            raise APIError(500, "the request ended without an output")
        for j, o in enumerate(out.outputs):
            lp = _logprobs(svc, out, j, body.logprobs, body.echo, 0) if body.logprobs is not None else None
            choices.append({"index": i * n + j, "text": (prompt_texts[i] if body.echo else "") + o.text,
                            "logprobs": lp, "finish_reason": o.finish_reason})
    gen.finish(200, "\n".join(c["text"] for c in choices))
    return JSONResponse({**base, "choices": choices, "usage": gen.usage()})
