"""POST /v1/chat/completions: the model's chat template, structured output, tool calls, streamed or not."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lmkernel.engine.request import PositionLogprobs, RequestOutput
from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.serve.checks import sampling, service
from lmkernel.serve.generation import Generation, top
from lmkernel.serve.protocol import APIError, ChatCompletionRequest
from lmkernel.serve.responses import ChatCompletionResponse, documented
from lmkernel.serve.tool_parsers import make_parser
from lmkernel.serve.tools import ToolPlan, plan_tools, template_messages

router = APIRouter()


def _logprobs(tok: Tokenizer, position: PositionLogprobs | None, token: int, n: int) -> dict[str, Any]:
    chosen = position.get(token) if position else None
    text = chosen.decoded_token if chosen and chosen.decoded_token is not None else tok.decode([token])
    return {"token": text, "logprob": chosen.logprob if chosen else None, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for _, lp, t in (top(position, n) if position else [])]}


def _tool_chunks(plan: ToolPlan, base: dict[str, Any], n: int) -> Callable[[int, RequestOutput], list[dict[str, Any]]]:
    """Chunks of a streamed chat with tools: text as `delta.content`, each call as `delta.tool_calls` (its
    index, id and name first, then fragments of its arguments), and "tool_calls" as the finish reason."""
    parsers = [make_parser(plan.parser, plan.tools) for _ in range(n)]

    def chunk(j: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": j, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def chunks(i: int, out: RequestOutput) -> list[dict[str, Any]]:
        result = []
        for j, o in enumerate(out.outputs):
            parser = parsers[j]
            events = parser.feed(o.delta_text) + (parser.finish() if o.finish_reason else [])
            for e in events:
                if e.index is not None:
                    result.append(chunk(j, {"tool_calls": [e.tool_delta()]}))
                elif e.content and not (parser.calls and not e.content.strip()):
                    result.append(chunk(j, {"content": e.content}))
            if o.finish_reason:
                reason = "tool_calls" if parser.calls and o.finish_reason == "stop" else o.finish_reason
                result.append(chunk(j, {}, reason))
        return result

    return chunks


@router.post("/v1/chat/completions", **documented(ChatCompletionRequest, ChatCompletionResponse))
async def chat(request: Request) -> Response:
    svc = service(request)
    key = svc.authenticate(request)
    body = await svc.parse(request, ChatCompletionRequest)
    adapter = svc.check_model(body.model, "generate")
    if not body.messages:
        raise APIError(400, "messages must not be empty", "messages")
    tok = svc.tokenizer
    plan = plan_tools(body.tools, body.tool_choice, tok.chat_template, svc.config.tool_call_parser, body.parallel_tool_calls)
    conversation = template_messages(body.messages)
    try:
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                      tools=plan.tools if plan is not None and plan.parses else None)
    except (LmkError, ValueError) as exc:
        raise APIError(400, str(exc), "messages") from None
    top_n = body.top_logprobs or 0
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    forced = (plan.choice, plan.grammar) if plan is not None and plan.grammar is not None else None  # a call is forced
    newer = body.max_completion_tokens is not None  # OpenAI's newer name for max_tokens wins
    names = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens" if newer else "max_tokens"}
    params, constrained_by = sampling(body, body.max_completion_tokens if newer else body.max_tokens,
                                      top_n if body.logprobs else None, forced, names)
    checked = svc.admit(key, [ids], dataclasses.replace(params, lora=adapter), "messages")
    gen = Generation(svc, "chat", key, checked, [json.dumps(conversation, ensure_ascii=False)], constrained_by)
    parses = plan is not None and plan.parses
    base = {"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}

    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        opening = [{**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]} for j in range(body.n)]
        if parses:
            return gen.stream(_tool_chunks(plan, base, body.n), opening, include, base)
        return gen.stream(_text_chunks(tok, base, top_n if body.logprobs else None), opening, include, base)

    await gen.collect(request)
    out = gen.final[0]
    if out is None:  # collect() returns only once every prompt finished
        raise APIError(500, "the request ended without an output")
    choices = _choices(out, tok, top_n if body.logprobs else None, plan if parses else None)
    gen.finish(200, "\n".join(o.text for o in out.outputs))
    return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": gen.usage()})


def _text_chunks(tok: Tokenizer, base: dict[str, Any], top_n: int | None
                 ) -> Callable[[int, RequestOutput], list[dict[str, Any]]]:
    """Chunks of a streamed chat without tool parsing: new text as `delta.content` (with the log-probs of its tokens
    when `top_n` is set), then the finish reason."""
    sent: dict[int, int] = {}

    def chunks(i: int, out: RequestOutput) -> list[dict[str, Any]]:
        result = []
        for j, o in enumerate(out.outputs):
            start = sent.get(j, 0)
            if o.delta_text or (o.delta_token_ids and top_n is not None):
                lp = None
                if top_n is not None:
                    lp = {"content": [_logprobs(tok, p, t, top_n) for t, p in
                                      list(zip(o.token_ids, o.logprobs or []))[start:]]}
                result.append({**base, "choices": [{"index": j, "delta": {"content": o.delta_text},
                                                    "logprobs": lp, "finish_reason": None}]})
            sent[j] = len(o.token_ids)
            if o.finish_reason:
                result.append({**base, "choices": [{"index": j, "delta": {}, "logprobs": None,
                                                    "finish_reason": o.finish_reason}]})
        return result

    return chunks


def _choices(out: RequestOutput, tok: Tokenizer, top_n: int | None, plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The choices of a whole chat answer; with a tool `plan` that parses, each text read for tool calls."""
    choices = []
    for j, o in enumerate(out.outputs):
        lp = None
        if top_n is not None:
            lp = {"content": [_logprobs(tok, p, t, top_n) for t, p in zip(o.token_ids, o.logprobs or [])]}
        message: dict[str, Any] = {"role": "assistant", "content": o.text}
        reason = o.finish_reason
        if plan is not None:  # a parser of its own for each choice: it reads the text by the steps a stream takes
            content, calls = make_parser(plan.parser, plan.tools).parse(o.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
                reason = "tool_calls" if reason == "stop" else reason
        choices.append({"index": j, "message": message, "logprobs": lp, "finish_reason": reason})
    return choices
