"""Request bodies of the OpenAI API as pydantic models, and the error every failure turns into.

Fields the OpenAI API has and lmkernel does not use (`user`, `logit_bias` absent) are accepted so
that the official clients work unchanged; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.structured import StructuredOutputError, StructuredOutputs


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# vLLM's older request fields for the same constraints, read as `structured_outputs`.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def error_param(field: str, exc: StructuredOutputError) -> str:
    """The request field to name for a constraint's error: vLLM's `structured_outputs.<kind>` as the engine
    names it, or the field the request used (`response_format`, `guided_json`, ...)."""
    return exc.param if field == "structured_outputs" else field


# OpenAI request fields with an effect lmkernel does not provide: refused (400 naming the field) when they
# ask for it, rather than answered as if they had been applied. Fields without an effect on the output
# (`user`, `metadata`, `store`, ...) are ignored, as OpenAI itself ignores unknown ones.
_NOT_SERVED = {
    "logit_bias": lambda v: bool(v), "best_of": lambda v: v not in (None, 1), "suffix": lambda v: bool(v),
    "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none", "auto"),
    "audio": lambda v: v is not None, "prediction": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
}


# OpenAI's nullable fields that lmkernel types without None: the official client sends null for an option
# passed as None, which OpenAI reads as the default.
_NULL_IS_DEFAULT = ("n", "stream", "logprobs", "echo")


def _given(value: Any, default: Any) -> Any:
    """A field's value, or its default when the request leaves it out (a 0 sent is a 0 judged)."""
    return default if value is None else value


class _Sampling(BaseModel):
    """The sampling fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, asks in _NOT_SERVED.items():
                if name in data and asks(data[name]):
                    raise APIError(400, f"{name} is not supported by this server; leave it out", name)
        return data

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _NULL_IS_DEFAULT}
        return data

    # Shapes only: every bound on these is SamplingParams' (the engine's) to decide, in one place.
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> tuple[str, dict[str, Any]] | None:
        """The field that constrains the output (`response_format`, vLLM's `structured_outputs` or one of its
        older `guided_*` fields) and the constraint as `StructuredOutputs` fields; None for free text."""
        asked: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
            asked.append(("response_format", {"json": fmt.json_schema.schema_}))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", self.structured_outputs))
        for name, kind in _GUIDED.items():
            if getattr(self, name) is not None:
                asked.append((name, {kind: getattr(self, name)}))
        if len(asked) > 1:
            raise APIError(400, f"{' and '.join(n for n, _ in asked)} each constrain the output: send one", asked[1][0])
        return asked[0] if asked else None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        forced: tuple[str, str] | None = None) -> tuple[SamplingParams, str | None]:
        """The body's SamplingParams, and the request field whose constraint they carry (None: free text).
        `forced`: (the tool_choice, its grammar) when a tool call is forced, refused beside another constraint.
        SamplingParams decides every bound: a value it refuses raises ValueError naming the field."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        asked = self.constraint()
        if forced is not None:
            if asked is not None:
                raise APIError(400, f"tool_choice '{forced[0]}' and {asked[0]} each constrain the output: send one",
                               asked[0])
            asked = ("tools", {"grammar": forced[1]})
        structured = None
        if asked is not None:
            try:
                structured = StructuredOutputs.from_dict(asked[1])
            except StructuredOutputError as exc:
                raise APIError(400, str(exc), error_param(asked[0], exc)) from None
        params = SamplingParams(structured_outputs=structured,
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=_given(self.temperature, 1.0), top_p=_given(self.top_p, 1.0), top_k=_given(self.top_k, 0),
            min_p=_given(self.min_p, 0.0), presence_penalty=_given(self.presence_penalty, 0.0),
            frequency_penalty=_given(self.frequency_penalty, 0.0), repetition_penalty=_given(self.repetition_penalty, 1.0),
            seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
        )
        return params, asked[0] if asked is not None else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class TextPart(BaseModel):
    """OpenAI's list-of-parts content; only text parts are served (no images or audio)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, as OpenAI returned them
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call where a call is forced


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    prompt_name: str | None = None  # one of the model's named prefixes ("query", "document"), as TEI names it


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a text (`prompt`) or a conversation (`messages`, through the chat template)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str


class RecommendRequest(BaseModel):
    """`POST /v1/recommend` (served with `lmk serve --recommender DIR`): a user's top k unseen items."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    k: int = Field(default=10, ge=1, le=1000)
    time: float | None = None  # recommend as of this time (default: after the latest interaction)


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest,
                  LoadLoraAdapterRequest, UnloadLoraAdapterRequest, RecommendRequest)
