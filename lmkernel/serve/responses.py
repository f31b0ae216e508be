"""Response bodies as the routes write them, and the route arguments that document each route's body and
answers in /openapi.json (the request bodies are protocol's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Without `stream`; with it, the same objects arrive as server-sent events (`data: {...}`), then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """Without `stream`; with it, `chat.completion.chunk` objects with `delta`s as server-sent events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64 of float32 with encoding_format "base64"


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # the base model of a LoRA adapter
    # An embedding model's: its prompt names (`prompt_name`), its width, and whether `dimensions` may cut it
    prompts: list[str] | None = None
    dimensions: int | None = None
    matryoshka: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


class LoraAdapterStatus(BaseModel):
    lora_name: str
    status: Literal["loaded", "unloaded"]
    model: str | None = None  # the name requests use, MODEL:NAME
    unloaded: str | None = None  # an adapter dropped to make room


class RecommendedItem(BaseModel):
    item: str
    title: str
    rank: int


class RecommendResponse(BaseModel):
    object: str = "recommendation"
    user: str
    items: list[RecommendedItem]


_ERRORS = {400: "invalid request (the field is named in error.param)", 401: "missing or wrong API key",
           403: "a path outside the directories the server was given", 404: "unknown model or route", 413: "body too large", 429: "queue full or over a rate limit",
           503: "shutting down"}


def documented(request: type[BaseModel] | None, response: type[BaseModel]) -> dict[str, Any]:
    """Route arguments that describe its body and answers in /openapi.json. The routes read the body
    themselves (so that every failure is an OpenAI error object naming the field); the request schema is
    added to the components by the app (`REQUEST_MODELS`)."""
    out: dict[str, Any] = {
        "responses": {200: {"model": response}, **{code: {"model": ErrorResponse, "description": text}
                                                    for code, text in _ERRORS.items()}},
    }
    if request is not None:
        out["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request.__name__}"}}}}}
    return out
