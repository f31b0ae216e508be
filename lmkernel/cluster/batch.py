"""`lmk batch`: a file in the OpenAI Batch API format run offline, one result line per request.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" |
"/v1/embeddings", "body"}`. Every request goes through the same application `lmk serve` runs (its checks,
chat templates, tool calls and structured output), in this process and without a socket, many at once so
the engine batches them. Results are OpenAI's output lines: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`; a request the API refuses keeps its 4xx response, and a line that is not a
request at all gets `"response": null` and an `"error"`, so one bad line never stops the job. Results are
appended and flushed as they finish; a rerun skips the custom_ids already in the output (a half-written last
line from an interrupted run is cut first).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkernel.errors import LmkError

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True)
class BatchRequest:
    """One request line of the input."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def result(custom_id: str | None, status: int | None, body: dict[str, Any] | None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """One output line in OpenAI's shape."""
    response = None if status is None else {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def parse_line(number: int, text: str, source: str) -> BatchRequest | dict[str, Any]:
    """A request, or the error result that stands for a line that is not one."""

    def bad(message: str, custom_id: str | None = None) -> dict[str, Any]:
        return result(custom_id, None, None, {"code": "invalid_request", "message": f"{source}:{number}: {message}",
                                              "line": number})

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(f"not JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return bad("expected a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad('expected "custom_id", a non-empty string')
    method, url, body = obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if method != "POST":
        return bad(f'"method" must be "POST"; got {method!r}', custom_id)
    if url not in URLS:
        return bad(f'"url" must be one of {", ".join(URLS)}; got {url!r}', custom_id)
    if not isinstance(body, dict):
        return bad('expected "body", a JSON object', custom_id)
    if body.get("stream"):
        return bad('"body.stream" must be false in a batch (each result is written whole)', custom_id)
    return BatchRequest(number, custom_id, url, body)


def read_requests(path: Path, done: set[str]) -> tuple[list[BatchRequest], list[dict[str, Any]]]:
    """The input's requests still to run, and error results for its bad lines (not already written)."""
    if not path.is_file():
        raise LmkError(f"{path}: no such input file")
    requests: list[BatchRequest] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            parsed = parse_line(number, text, str(path))
            if isinstance(parsed, dict):
                if f"line {number}" not in done:
                    errors.append(parsed)
                continue
            if parsed.custom_id in seen:
                if f"line {number}" not in done:
                    errors.append(result(parsed.custom_id, None, None, {
                        "code": "duplicate_custom_id", "line": number,
                        "message": f"{path}:{number}: custom_id {parsed.custom_id!r} was used by an earlier line"}))
                continue
            seen.add(parsed.custom_id)
            if parsed.custom_id not in done:
                requests.append(parsed)
    return requests, errors


def written_ids(path: Path) -> set[str]:
    """The results already in the output (`result_key`); a torn last line is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done: set[str] = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LmkError(f"{path}:{number}: the output file has a line that is not a batch result; "
                           "give a new output path or remove it") from None
        done.add(result_key(obj))
    return done


def result_key(line: dict[str, Any]) -> str:
    """What a written result stands for: its custom_id, or "line N" for a line that was not a request."""
    error = line.get("error") or {}
    return f"line {error['line']}" if "line" in error else str(line.get("custom_id"))


class InProcessAPI:
    """The `lmk serve` application called without a socket: a request in, (status, JSON body) out."""

    def __init__(self, app: Any) -> None:
        import httpx

        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lmk-batch",  # nosec B113  # an in-process ASGI transport: a batch request may run as long as it needs
                                        timeout=None)

    async def call(self, request: BatchRequest, default_model: str | None) -> dict[str, Any]:
        body = request.body if "model" in request.body or default_model is None else {**request.body, "model": default_model}
        response = await self.client.post(request.url, json=body)
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": {"message": response.text, "type": "server_error"}}
        return result(request.custom_id, response.status_code, payload)

    async def run(self, requests: Iterable[BatchRequest], concurrency: int,
                  default_model: Callable[[BatchRequest], str | None]) -> AsyncIterator[dict[str, Any]]:
        """Results as they finish, at most `concurrency` requests in flight."""
        pending: set[asyncio.Task[dict[str, Any]]] = set()
        for request in requests:
            if len(pending) >= concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
            pending.add(asyncio.ensure_future(self.call(request, default_model(request))))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()


def default_models(model_name: str | None, embedding_model_name: str | None) -> Callable[[BatchRequest], str | None]:
    """The model a body without "model" gets: the decoder for generation, the encoder for embeddings."""
    return lambda r: embedding_model_name if r.url == "/v1/embeddings" else model_name


class ResultWriter:
    """Appends result lines to the output, each flushed and synced so an interruption loses none written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.count = 0

    def write(self, line: dict[str, Any]) -> None:
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()
        self.count += 1
        if self.count % 64 == 0:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def run_local(app: Any, requests: list[BatchRequest], writer: ResultWriter, concurrency: int,
              default_model: Callable[[BatchRequest], str | None], on_result: Callable[[dict[str, Any]], None]) -> float:
    """Run the requests through `app` in this process and write each result as it finishes; returns the
    seconds from the first request to the last result."""
    api = InProcessAPI(app)

    async def main() -> float:
        start = time.perf_counter()
        async for line in api.run(requests, concurrency, default_model):
            writer.write(line)
            on_result(line)
        seconds = time.perf_counter() - start
        await api.client.aclose()
        return seconds

    return asyncio.run(main())
