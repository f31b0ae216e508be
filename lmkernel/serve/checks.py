"""What every route shares: the server's configuration and state, and the checks of a request in one
place (its key, its body, the model it names, whether it fits, the queue and the rate limits)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from lmkernel.config import ServerConfig
from lmkernel.engine.async_embedder import AsyncEmbedder
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.request import CheckedPrompt
from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.structured import StructuredOutputError
from lmkernel.errors import ContextLengthError, LmkError
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.serve.auth import Gatekeeper
from lmkernel.serve.metrics import Metrics
from lmkernel.serve.protocol import APIError, error_param

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ServerState:
    draining: bool = False
    in_flight: int = 0  # API calls being answered (streams included): shutdown waits for them
    generating: int = 0  # of which completions and chats: the queue limit counts these


def validation_error(exc: ValidationError) -> APIError:
    """400 naming the first offending field, as `max_tokens` or `messages[0].role`."""
    first = exc.errors()[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    if len(loc) >= 3 and isinstance(loc[1], int) and param == "messages":
        param = f"messages[{loc[1]}].{loc[2]}"
    return APIError(400, f"{param or 'body'}: {first['msg']}", param)


def inputs(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str | list[int]]:
    """OpenAI's four input forms (text, texts, token ids, lists of ids) as one list of texts or id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, f"{param} must not be empty", param)
    if isinstance(value[0], int):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


class Recommends(Protocol):
    """What `POST /v1/recommend` needs of a recommender (`lmk serve --recommender DIR` passes one in):
    the top k unseen items of a user, or `LmkError` for an unknown user."""

    def query(self, user: str, k: int = 10, now: float | None = None) -> list[dict[str, Any]]: ...


@dataclass
class Service:
    """The served models and the request checks the routes share (one per app, in `app.state.service`)."""

    config: ServerConfig
    engine: AsyncEngine | None
    embedder: AsyncEmbedder | None
    recommender: Recommends | None = None
    state: ServerState = field(default_factory=ServerState)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        c = self.config
        self.gate = Gatekeeper(c.api_keys, c.requests_per_minute, c.tokens_per_minute)
        self.metrics = Metrics(self.engine.stats if self.engine is not None else None, ready=lambda: not self.state.draining)

    def authenticate(self, request: Request) -> str | None:
        """The caller's key (None with open access); 401 otherwise."""
        return self.gate.authenticate(request.headers.get("authorization"))

    async def parse(self, request: Request, model: type[Body]) -> Body:
        """The JSON body as `model`: 413 past --max-body-bytes, 400 naming the field for anything malformed."""
        limit = self.config.max_body_bytes
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
            raise validation_error(exc) from None

    # -- the models served -------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """MODEL:NAME -> NAME of every adapter loaded now (they come and go with --allow-runtime-lora)."""
        if self.engine is None or not self.config.model_name:
            return {}
        return {f"{self.config.model_name}:{a}": a for a in self.engine.lora_names}

    def served(self) -> list[str]:
        c = self.config
        names = [c.model_name if self.engine else None, *self.adapters(), c.embedding_model_name if self.embedder else None]
        return [n for n in names if n]

    def check_model(self, name: str, kind: str) -> str | None:
        """404 for a model not served, 400 for one that cannot do this; the LoRA adapter a MODEL:NAME asks for."""
        want = self.config.model_name if kind == "generate" else self.config.embedding_model_name
        served = self.served()
        if name not in served:
            raise APIError(404, f"model '{name}' does not exist; served: {', '.join(served)}", "model", "model_not_found")
        adapters = self.adapters()
        if name != want and not (kind == "generate" and name in adapters):
            raise APIError(400, f"model '{name}' cannot serve {'embeddings' if kind == 'embed' else 'completions'}",
                           "model")
        return adapters.get(name)

    def generator(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(404, "this server serves no generation model", "model")
        return self.engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.generator().tokenizer

    # -- admission ---------------------------------------------------------------------------------

    def admit(self, key: str | None, prompts: list[list[int]], params: SamplingParams, param: str) -> list[CheckedPrompt]:
        """Every prompt checked by the engine (ids in the vocabulary, within what one request may hold; it fills
        the default max_tokens), a place in the queue, and the key's token budget charged; a 400 or 429 naming
        what is wrong otherwise. The checked prompts go to the engine as they are."""
        engine = self.generator()
        if params.n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n} on this server; got {params.n}", "n")
        try:
            checked = [engine.check_prompt(ids, params) for ids in prompts]
        except (LmkError, ValueError) as exc:
            raise engine_error(exc, param) from None
        if self.state.generating >= self.config.max_queued_requests:
            raise APIError(429, f"the server is at its limit of {self.config.max_queued_requests} requests; retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        self.gate.charge(key, sum(c.most_tokens for c in checked))
        return checked


def engine_error(exc: Exception, param: str | None) -> APIError:
    """The 400 for a request the engine refuses (the one place engine errors become HTTP errors)."""
    if isinstance(exc, StructuredOutputError):
        return APIError(400, str(exc), error_param(param or "structured_outputs", exc))
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return APIError(400, str(exc), param, code)


def service(request: Request) -> Service:
    return request.app.state.service


def sampling(body: Any, max_tokens: int | None, logprobs: int | None, forced: tuple[str, str] | None = None,
             names: dict[str, str] | None = None) -> tuple[SamplingParams, str | None]:
    """The body's SamplingParams and the field that constrains its output; a 400 naming the request field
    (`names`: where a SamplingParams field is spelled otherwise) that SamplingParams, the one judge of
    sampling values, refuses."""
    try:
        return body.sampling_params(max_tokens, logprobs, forced)
    except ValueError as exc:  # SamplingParams names its field: "SamplingParams.top_p must be ..."
        field_name = str(exc).removeprefix("SamplingParams.").split(" ")[0]
        param = (names or {}).get(field_name, field_name)
        raise APIError(400, f"{param}{str(exc).removeprefix('SamplingParams.')[len(field_name):]}", param) from None
