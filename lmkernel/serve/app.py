"""The OpenAI-compatible HTTP API over an `AsyncEngine` (generation) and an encoder (embeddings).

Every failure leaves as an OpenAI error object with a 4xx status; only a fault of lmkernel itself
may answer 500. A client that goes away has its requests aborted at the next engine step.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.request import PositionLogprobs, RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.structured import StructuredOutputError, StructuredOutputs
from lmkernel.errors import AdapterError, LmkError
from lmkernel.loading import LoadedModel
from lmkernel.serve.auth import Gatekeeper, key_hash
from lmkernel.serve.logs import log_request
from lmkernel.serve.metrics import Metrics
from lmkernel.serve.protocol import (
    ROLES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
    error_param,
)
from lmkernel.serve.tool_parsers import make_parser
from lmkernel.serve.tools import ToolPlan, plan_tools, template_messages


@dataclass
class ServerConfig:
    """What `lmk serve` was told; see its --help for each field."""

    model_name: str | None
    embedding_model_name: str | None = None
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_queued_requests: int = 256
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    request_timeout: float | None = None
    log_prompts: bool = False
    tool_call_parser: str | None = None  # None: chosen from the model's chat template
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter


@dataclass
class ServerState:
    draining: bool = False
    in_flight: int = 0  # API calls being answered (streams included): shutdown waits for them
    generating: int = 0  # of which completions and chats: the queue limit counts these


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(exc: ValidationError) -> APIError:
    """400 naming the first offending field, as `max_tokens` or `messages[0].role`."""
    first = exc.errors()[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    if len(loc) >= 3 and isinstance(loc[1], int) and param == "messages":
        param = f"messages[{loc[1]}].{loc[2]}"
    return APIError(400, f"{param or 'body'}: {first['msg']}", param)


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


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise APIError(413, f"request body of {len(body)} bytes exceeds the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _top(position: PositionLogprobs, n: int) -> list[tuple[int, float, str]]:
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank)
    return [(t, lp.logprob, lp.decoded_token or "") for t, lp in ranked if lp.rank <= n][:n]


class _Generation:
    """One HTTP request's engine requests (one per prompt), their outputs and timings."""

    def __init__(self, prompts: list[list[int]], texts: list[str | None], params: SamplingParams,
                 constraint: tuple[str, dict[str, Any]] | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.prompts, self.texts, self.params = prompts, texts, params
        self.constraint = constraint  # (request field, fields) of a structured-output request
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.final: list[RequestOutput | None] = [None] * len(prompts)
        self.queue_seconds: float | None = None

    def engine_id(self, i: int) -> str:
        return f"{self.id}-{i}"

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for r in self.final if r is not None for o in r.outputs)


def build_app(config: ServerConfig, engine: AsyncEngine | None, embedder: LoadedModel | None) -> FastAPI:
    """The FastAPI application; `engine` serves completions and chat, `embedder` embeddings."""
    app = FastAPI(title="lmkernel", docs_url=None, redoc_url=None)
    state = ServerState()
    gate = Gatekeeper(config.api_keys, config.requests_per_minute, config.tokens_per_minute)
    metrics = Metrics(engine.stats if engine is not None else None, ready=lambda: not state.draining)
    app.state.server = state
    app.state.metrics = metrics
    created = int(time.time())

    app.add_middleware(_Guard, state=state, metrics=metrics)

    @app.exception_handler(Exception)
    async def on_fault(request: Request, exc: Exception) -> JSONResponse:  # a fault of lmkernel, not of the input
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

    def adapters() -> dict[str, str]:
        """MODEL:NAME -> NAME of every adapter loaded now (they come and go with --allow-runtime-lora)."""
        if engine is None or not config.model_name:
            return {}
        return {f"{config.model_name}:{a}": a for a in engine.engine.lora_names if a not in engine.engine.unloading}

    def served() -> list[str]:
        names = [config.model_name if engine else None, *adapters(), config.embedding_model_name if embedder else None]
        return [n for n in names if n]

    def check_model(name: str, kind: str) -> str | None:
        """404 for a model not served, 400 for one that cannot do this; the LoRA adapter a MODEL:NAME asks for."""
        want = config.model_name if kind == "generate" else config.embedding_model_name
        if name not in served():
            raise APIError(404, f"model '{name}' does not exist; served: {', '.join(served())}", "model", "model_not_found")
        if name != want and not (kind == "generate" and name in adapters()):
            raise APIError(400, f"model '{name}' cannot serve {'embeddings' if kind == 'embed' else 'completions'}",
                           "model")
        return adapters().get(name)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if state.draining:
            return _error_response(APIError(503, "the server is shutting down", code="draining"))
        return JSONResponse({"status": "ready", "models": served()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gate.authenticate(request.headers.get("authorization"))
        loaded = adapters()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "lmkernel",
                                            **({"parent": config.model_name} if n in loaded else {})}
                                           for n in served()]}

    # -- LoRA adapters at run time (vLLM's endpoints; --allow-runtime-lora, which needs API keys) ---------

    def runtime_lora(request: Request) -> AsyncEngine:
        gate.authenticate(request.headers.get("authorization"))
        if not config.allow_runtime_lora or engine is None:
            raise APIError(404, "loading LoRA adapters at run time is off; start lmk serve with --allow-runtime-lora",
                           code="not_enabled")
        return engine

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        served_engine = runtime_lora(request)
        body: LoadLoraAdapterRequest = await _parse(request, LoadLoraAdapterRequest, config.max_body_bytes)
        name = body.lora_name
        if not name or ":" in name or name != name.strip():
            raise APIError(400, f"lora_name {name!r}: expected a non-empty name without ':' or surrounding spaces", "lora_name")
        if name in served_engine.engine.lora_names:
            raise APIError(400, f"an adapter named '{name}' is already loaded; unload it first", "lora_name")
        try:
            dropped = await served_engine.load_adapter(name, body.lora_path)
        except AdapterError as exc:
            raise APIError(400, str(exc), None if "adapter slots" in str(exc) else "lora_path") from None
        return {"lora_name": name, "status": "loaded", "model": f"{config.model_name}:{name}", "unloaded": dropped}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> dict[str, Any]:
        served_engine = runtime_lora(request)
        body: UnloadLoraAdapterRequest = await _parse(request, UnloadLoraAdapterRequest, config.max_body_bytes)
        if body.lora_name not in served_engine.engine.lora_names or body.lora_name in served_engine.engine.unloading:
            raise APIError(404, f"LoRA adapter '{body.lora_name}' is not loaded", "lora_name")
        await served_engine.unload_adapter(body.lora_name)
        return {"lora_name": body.lora_name, "status": "unloaded"}

    # -- generation -------------------------------------------------------------------------------

    def tokenize_prompts(body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        items = _inputs(body.prompt, "prompt")
        tok = engine.engine.tokenizer  # type: ignore[union-attr]
        ids = [tok.encode(x) if isinstance(x, str) else list(x) for x in items]
        if any(not x for x in ids):
            raise APIError(400, "every prompt needs at least one token", "prompt")
        return ids, [x if isinstance(x, str) else None for x in items]

    def admit(key: str | None, prompts: list[list[int]], params: SamplingParams, param: str) -> SamplingParams:
        core = engine.engine  # type: ignore[union-attr]
        limit = core.scheduler.max_tokens_per_request()
        vocab = core.loaded.config.vocab_size
        for ids in prompts:
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param)
            wanted = params.max_tokens if params.max_tokens is not None else 1
            if len(ids) + wanted > limit:
                raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens asks for {wanted} more "
                               f"({len(ids) + wanted} in all), beyond the {limit} tokens one request may use here "
                               f"(context length {core.max_model_len}, KV cache "
                               f"{core.pool.num_blocks * core.pool.block_size} tokens)", param, "context_length_exceeded")
        if state.generating >= config.max_queued_requests:
            raise APIError(429, f"the server is at its limit of {config.max_queued_requests} requests; retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        budget = sum(len(ids) + (params.max_tokens or limit - len(ids)) * params.n for ids in prompts)
        gate.charge(key, budget)
        return params

    async def run_one(gen: _Generation, i: int, sink: asyncio.Queue[tuple[int, RequestOutput] | BaseException]) -> None:
        try:
            async for out in engine.generate(gen.prompts[i], gen.params, gen.engine_id(i)):  # type: ignore[union-attr]
                now = time.monotonic()
                if any(o.delta_token_ids for o in out.outputs):
                    if gen.first_token is None:
                        gen.first_token = now
                        metrics.ttft.observe(now - gen.start)
                    elif gen.last_token is not None:
                        metrics.itl.observe(now - gen.last_token)
                    gen.last_token = now
                if gen.queue_seconds is None and out.queue_seconds is not None:
                    gen.queue_seconds = out.queue_seconds
                    metrics.queue.observe(out.queue_seconds)
                if out.finished:
                    gen.final[i] = out
                await sink.put((i, out))
        except StructuredOutputError as exc:  # its grammar failed to compile
            field = gen.constraint[0] if gen.constraint else "structured_outputs"
            await sink.put(APIError(400, str(exc), error_param(field, exc)))
        except (LmkError, ValueError) as exc:
            await sink.put(APIError(400, str(exc), "prompt"))
        except Exception as exc:  # noqa: BLE001 - reported to the caller as a failed request
            await sink.put(exc)

    async def outputs(gen: _Generation) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt as they come; aborts what is left when the consumer stops early."""
        sink: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        tasks = [asyncio.create_task(run_one(gen, i, sink)) for i in range(len(gen.prompts))]
        state.generating += 1
        try:
            remaining = len(gen.prompts)
            deadline = None if config.request_timeout is None else gen.start + config.request_timeout
            while remaining:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(sink.get(), timeout)
                except TimeoutError:
                    raise APIError(408, f"the request ran past --request-timeout ({config.request_timeout} s) and was "
                                   "aborted", code="timeout") from None
                if isinstance(item, BaseException):
                    raise item
                if item[1].finished:
                    remaining -= 1
                yield item
        finally:
            state.generating -= 1
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def finish(gen: _Generation, endpoint: str, key: str | None, status: int, outputs_text: str | None = None) -> None:
        end = time.monotonic()
        metrics.e2e.observe(end - gen.start)
        metrics.prompt_tokens.inc(gen.prompt_tokens)
        metrics.generation_tokens.inc(gen.completion_tokens)
        record = {
            "id": gen.id, "endpoint": endpoint, "key": key_hash(key), "model": config.model_name, "status": status,
            "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "ttft_s": None if gen.first_token is None else round(gen.first_token - gen.start, 4),
            "e2e_s": round(end - gen.start, 4), "queue_s": gen.queue_seconds,
        }
        prompt = "\n".join(t for t in gen.texts if t) or None
        if outputs_text is None:  # streamed: the final outputs hold the whole texts
            outputs_text = "\n".join(o.text for r in gen.final if r is not None for o in r.outputs) or None
        log_request(record, prompt, outputs_text, config.log_prompts)

    async def collect(request: Request, gen: _Generation) -> None:
        async def drain() -> None:
            async for _ in outputs(gen):
                pass

        work = asyncio.create_task(drain())
        watcher = asyncio.create_task(_until_disconnected(request))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if work not in done:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "client disconnected", code="client_disconnected")
        work.result()

    def usage(gen: _Generation) -> dict[str, int]:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    def sse(data: dict[str, Any] | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

    def stream(gen: _Generation, endpoint: str, key: str | None, chunks: Callable[[int, RequestOutput], list[dict[str, Any]]],
               opening: list[dict[str, Any]], include_usage: bool, base: dict[str, Any]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            status = 200
            try:
                for chunk in opening:
                    yield sse(chunk)
                async for i, out in outputs(gen):
                    for chunk in chunks(i, out):
                        yield sse(chunk)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(gen)})
            except APIError as err:
                status = err.status
                yield sse(err.body())
            except Exception:  # noqa: BLE001 - the stream ends with an error object rather than a cut connection
                status = 500
                yield sse({"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}})
            except asyncio.CancelledError:  # the client went away
                status = 499
                raise
            finally:
                finish(gen, endpoint, key, status)
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def completion_logprobs(out: RequestOutput, j: int, n: int, echo: bool, prompt_text: str, start_token: int,
                            start_offset: int) -> dict[str, Any]:
        sample = out.outputs[j]
        positions: list[tuple[int, PositionLogprobs | None]] = []
        if echo:
            positions += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
        positions += list(zip(sample.token_ids, sample.logprobs or []))[start_token:]
        tokens, lps, tops, offsets = [], [], [], []
        offset = start_offset
        for token, position in positions:
            text = position[token].decoded_token if position and token in position else None
            text = text if text is not None else engine.engine.tokenizer.decode([token])  # type: ignore[union-attr]
            tokens.append(text)
            lps.append(position[token].logprob if position and token in position else None)
            tops.append({t: lp for _, lp, t in _top(position, n)} if position else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        key = gate.authenticate(request.headers.get("authorization"))
        body: CompletionRequest = await _parse(request, CompletionRequest, config.max_body_bytes)
        adapter = check_model(body.model, "generate")
        prompts, texts = tokenize_prompts(body)
        params = admit(key, prompts, _with_adapter(_sampling(body, body.max_tokens, body.logprobs), adapter), "prompt")
        if body.echo and body.logprobs is not None:
            params = _replace(params, prompt_logprobs=body.logprobs)
        gen = _Generation(prompts, texts, params, body.constraint())
        n = body.n
        base = {"id": f"cmpl-{gen.id}", "object": "text_completion", "created": int(time.time()), "model": body.model}
        tok = engine.engine.tokenizer  # type: ignore[union-attr]
        prompt_texts = [t if t is not None else tok.decode(p) for t, p in zip(texts, prompts)]

        if body.stream:
            sent = {}  # (prompt, sample) -> tokens already sent

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
                        lp = completion_logprobs(out, j, body.logprobs, first and body.echo, prompt_texts[i], done_tokens, 0)
                    sent[(i, j)] = len(o.token_ids)
                    result.append({**base, "choices": [{"index": i * n + j, "text": text, "logprobs": lp,
                                                        "finish_reason": o.finish_reason}]})
                return result

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(gen, "completions", key, chunks, [], include, base)

        try:
            await collect(request, gen)
        except APIError as err:
            finish(gen, "completions", key, err.status)
            raise
        choices = []
        for i, out in enumerate(gen.final):
            assert out is not None
            for j, o in enumerate(out.outputs):
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(out, j, body.logprobs, body.echo, prompt_texts[i], 0, 0)
                choices.append({"index": i * n + j, "text": (prompt_texts[i] if body.echo else "") + o.text,
                                "logprobs": lp, "finish_reason": o.finish_reason})
        finish(gen, "completions", key, 200, "\n".join(c["text"] for c in choices))
        return JSONResponse({**base, "choices": choices, "usage": usage(gen)})

    def chat_logprobs(position: PositionLogprobs | None, token: int, n: int) -> dict[str, Any]:
        tok = engine.engine.tokenizer  # type: ignore[union-attr]
        chosen = position.get(token) if position else None
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else tok.decode([token])
        return {"token": text, "logprob": chosen.logprob if chosen else None, "bytes": list(text.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                 for _, lp, t in (_top(position, n) if position else [])]}

    def tool_chunks(plan: ToolPlan, base: dict[str, Any], n: int) -> Callable[[int, RequestOutput], list[dict[str, Any]]]:
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

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key = gate.authenticate(request.headers.get("authorization"))
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest, config.max_body_bytes)
        adapter = check_model(body.model, "generate")
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        for i, m in enumerate(body.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}].role '{m.role}' is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        tok = engine.engine.tokenizer  # type: ignore[union-attr]
        plan = plan_tools(body.tools, body.tool_choice, tok.chat_template, config.tool_call_parser)
        conversation = template_messages(body.messages)
        try:
            ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                          tools=plan.tools if plan is not None and plan.parses else None)
        except (LmkError, ValueError) as exc:
            raise APIError(400, str(exc), "messages") from None
        top = body.top_logprobs or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(body, max_tokens, top if body.logprobs else None)
        constraint = body.constraint()
        if plan is not None and plan.grammar is not None:  # "required" or a named function: a call is forced
            if constraint is not None:
                raise APIError(400, f"tool_choice '{plan.choice}' and {constraint[0]} each constrain the output: send one",
                               constraint[0])
            params = _replace(params, structured_outputs=StructuredOutputs(grammar=plan.grammar))
            constraint = ("tools", {"grammar": plan.grammar})
        params = admit(key, [ids], _with_adapter(params, adapter), "messages")
        gen = _Generation([ids], [json.dumps(conversation, ensure_ascii=False)], params, constraint)
        parse = make_parser(plan.parser, plan.tools).parse if plan is not None and plan.parses else None
        base = {"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.model}

        if body.stream:
            sent: dict[int, int] = {}
            opening = [{**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                             "finish_reason": None}]} for j in range(body.n)]
            if parse is not None:
                return stream(gen, "chat", key, tool_chunks(plan, base, body.n), opening,
                              bool(body.stream_options and body.stream_options.include_usage), base)

            def chunks(i: int, out: RequestOutput) -> list[dict[str, Any]]:
                result = []
                for j, o in enumerate(out.outputs):
                    start = sent.get(j, 0)
                    if o.delta_text or (o.delta_token_ids and body.logprobs):
                        lp = None
                        if body.logprobs:
                            lp = {"content": [chat_logprobs(p, t, top) for t, p in
                                              list(zip(o.token_ids, o.logprobs or []))[start:]]}
                        result.append({**base, "choices": [{"index": j, "delta": {"content": o.delta_text},
                                                            "logprobs": lp, "finish_reason": None}]})
                    sent[j] = len(o.token_ids)
                    if o.finish_reason:
                        result.append({**base, "choices": [{"index": j, "delta": {}, "logprobs": None,
                                                            "finish_reason": o.finish_reason}]})
                return result

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(gen, "chat", key, chunks, opening, include, base)

        try:
            await collect(request, gen)
        except APIError as err:
            finish(gen, "chat", key, err.status)
            raise
        out = gen.final[0]
        assert out is not None
        choices = []
        for j, o in enumerate(out.outputs):
            lp = None
            if body.logprobs:
                lp = {"content": [chat_logprobs(p, t, top) for t, p in zip(o.token_ids, o.logprobs or [])]}
            message: dict[str, Any] = {"role": "assistant", "content": o.text}
            reason = o.finish_reason
            if parse is not None:
                content, calls = parse(o.text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": j, "message": message, "logprobs": lp, "finish_reason": reason})
        finish(gen, "chat", key, 200, "\n".join(o.text for o in out.outputs))
        return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage(gen)})

    # -- tokenizer (vLLM's endpoints at the root: lm-evaluation-harness's remote tokenizer reads them) ----

    def generation_tokenizer(request: Request, model: str | None) -> Any:
        gate.authenticate(request.headers.get("authorization"))
        if model is not None:
            check_model(model, "generate")
        if engine is None:
            raise APIError(404, "this server serves no generation model, so no tokenizer", "model")
        return engine.engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body: TokenizeRequest = await _parse(request, TokenizeRequest, config.max_body_bytes)
        tok = generation_tokenizer(request, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            try:
                ids = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt, tokenize=True)
            except (LmkError, ValueError) as exc:
                raise APIError(400, str(exc), "messages") from None
        strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body: DetokenizeRequest = await _parse(request, DetokenizeRequest, config.max_body_bytes)
        tok = generation_tokenizer(request, body.model)
        vocab = engine.engine.loaded.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        tok = generation_tokenizer(request, None)
        specials = {name: tok.special_tokens.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": tok.chat_template,
                "model_max_length": engine.engine.max_model_len, "vocab_size": tok.vocab_size}

    # -- embeddings -------------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        key = gate.authenticate(request.headers.get("authorization"))
        body: EmbeddingRequest = await _parse(request, EmbeddingRequest, config.max_body_bytes)
        check_model(body.model, "embed")
        assert embedder is not None
        if body.dimensions is not None:
            raise APIError(400, f"model '{body.model}' cannot truncate its {embedder.config.hidden_size}-dimensional "
                           "embeddings; leave 'dimensions' out", "dimensions")
        items = _inputs(body.input, "input")
        ids = [embedder.tokenizer.encode(x) if isinstance(x, str) else x for x in items]
        limit = embedder.max_input_tokens
        for i, x in enumerate(ids):
            if not x:
                raise APIError(400, f"input[{i}] is empty", "input")
            if len(x) > limit:
                raise APIError(400, f"input[{i}] has {len(x)} tokens; this model takes at most {limit}", "input",
                               "context_length_exceeded")
        tokens = sum(map(len, ids))
        gate.charge(key, tokens)
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
        metrics.prompt_tokens.inc(tokens)
        metrics.e2e.observe(time.monotonic() - start)
        log_request({"id": uuid.uuid4().hex, "endpoint": "embeddings", "key": key_hash(key), "model": body.model,
                     "status": 200, "prompt_tokens": tokens, "e2e_s": round(time.monotonic() - start, 4)})
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return app


def _inputs(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str | list[int]]:
    """OpenAI's four input forms (text, texts, token ids, lists of ids) as one list of texts or id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, f"{param} must not be empty", param)
    if isinstance(value[0], int):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:  # SamplingParams names the field
        field_name = str(exc).split(" ")[0].removeprefix("SamplingParams.")
        raise APIError(400, str(exc), field_name) from None


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    return dataclasses.replace(params, **changes)


def _with_adapter(params: SamplingParams, adapter: str | None) -> SamplingParams:
    """The params of a request for MODEL:ADAPTER; a base-model request's as they are."""
    return params if adapter is None else dataclasses.replace(params, lora=adapter)
