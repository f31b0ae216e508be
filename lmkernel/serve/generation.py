"""Running one HTTP request's prompts on the engine: outputs as they come, the request timeout, client
disconnects, server-sent events, metrics and the request log line (completions and chat share it)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmkernel.engine.request import CheckedPrompt, PositionLogprobs, RequestOutput
from lmkernel.engine.structured import StructuredOutputError
from lmkernel.errors import LmkError
from lmkernel.serve.auth import key_hash
from lmkernel.serve.checks import Service, engine_error
from lmkernel.serve.logs import log_request
from lmkernel.serve.protocol import APIError


def top(position: PositionLogprobs, n: int) -> list[tuple[int, float, str]]:
    """(token, logprob, text) of the n most likely tokens at a position."""
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank)
    return [(t, lp.logprob, lp.decoded_token or "") for t, lp in ranked if lp.rank <= n][:n]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Generation:
    """One HTTP request's engine requests (one per prompt), their outputs and timings."""

    def __init__(self, service: Service, endpoint: str, key: str | None, prompts: list[CheckedPrompt],
                 texts: list[str | None], constrained_by: str | None = None) -> None:
        self.service, self.endpoint, self.key = service, endpoint, key
        self.id = uuid.uuid4().hex
        self.prompts, self.texts = prompts, texts
        self.constrained_by = constrained_by  # the request field of a structured-output constraint
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.final: list[RequestOutput | None] = [None] * len(prompts)
        self.queue_seconds: float | None = None

    def engine_id(self, i: int) -> str:
        return f"{self.id}-{i}"

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for r in self.final if r is not None for o in r.outputs)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def _run_one(self, i: int, sink: asyncio.Queue[tuple[int, RequestOutput] | BaseException]) -> None:
        metrics = self.service.metrics
        try:
            async for out in self.service.generator().generate(self.prompts[i], None, self.engine_id(i)):
                now = time.monotonic()
                if any(o.delta_token_ids for o in out.outputs):
                    if self.first_token is None:
                        self.first_token = now
                        metrics.ttft.observe(now - self.start)
                    elif self.last_token is not None:
                        metrics.itl.observe(now - self.last_token)
                    self.last_token = now
                if self.queue_seconds is None and out.queue_seconds is not None:
                    self.queue_seconds = out.queue_seconds
                    metrics.queue.observe(out.queue_seconds)
                if out.finished:
                    self.final[i] = out
                await sink.put((i, out))
        except StructuredOutputError as exc:  # its grammar failed to compile
            await sink.put(engine_error(exc, self.constrained_by))
        except (LmkError, ValueError) as exc:
            await sink.put(engine_error(exc, "prompt"))
        except Exception as exc:  # noqa: BLE001 - reported to the caller as a failed request
            await sink.put(exc)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt as they come; aborts what is left when the consumer stops early."""
        state, timeout_s = self.service.state, self.service.config.request_timeout
        sink: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        tasks = [asyncio.create_task(self._run_one(i, sink)) for i in range(len(self.prompts))]
        state.generating += 1
        try:
            remaining = len(self.prompts)
            deadline = None if timeout_s is None else self.start + timeout_s
            while remaining:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(sink.get(), timeout)
                except TimeoutError:
                    raise APIError(408, f"the request ran past --request-timeout ({timeout_s} s) and was aborted",
                                   code="timeout") from None
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

    def finish(self, status: int, outputs_text: str | None = None) -> None:
        """Metrics and the request's log line (prompts and outputs only with --log-prompts, redacted)."""
        metrics, config = self.service.metrics, self.service.config
        end = time.monotonic()
        metrics.e2e.observe(end - self.start)
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.generation_tokens.inc(self.completion_tokens)
        record = {
            "id": self.id, "endpoint": self.endpoint, "key": key_hash(self.key), "model": config.model_name,
            "status": status, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_token is None else round(self.first_token - self.start, 4),
            "e2e_s": round(end - self.start, 4), "queue_s": self.queue_seconds,
        }
        prompt = "\n".join(t for t in self.texts if t) or None
        if outputs_text is None:  # streamed: the final outputs hold the whole texts
            outputs_text = "\n".join(o.text for r in self.final if r is not None for o in r.outputs) or None
        log_request(record, prompt, outputs_text, config.log_prompts)

    async def collect(self, request: Request) -> None:
        """Run to the end (aborted if the client goes away); the final outputs land in `final`."""
        async def drain() -> None:
            async for _ in self.outputs():
                pass

        async def until_disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        work = asyncio.create_task(drain())
        watcher = asyncio.create_task(until_disconnected())
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        try:
            if work not in done:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                raise APIError(499, "client disconnected", code="client_disconnected")
            work.result()
        except APIError as err:
            self.finish(err.status)
            raise

    def stream(self, chunks: Callable[[int, RequestOutput], list[dict[str, Any]]], opening: list[dict[str, Any]],
               include_usage: bool, base: dict[str, Any]) -> StreamingResponse:
        """Server-sent events: `opening`, then `chunks` of each output as it comes, usage, [DONE]."""
        async def body() -> AsyncIterator[str]:
            status = 200
            try:
                for chunk in opening:
                    yield sse(chunk)
                async for i, out in self.outputs():
                    for chunk in chunks(i, out):
                        yield sse(chunk)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": self.usage()})
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
                self.finish(status)
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
