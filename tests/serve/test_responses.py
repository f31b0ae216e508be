"""The response models and `documented()`: the answers every route declares (its own body for 200, the
OpenAI error object for each failure), the request body it refers to, and what the models accept."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from lmkernel.serve.app import ServerConfig, build_app
from lmkernel.serve.protocol import APIError, TokenizeRequest
from lmkernel.serve.responses import (
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    LoraAdapterStatus,
    ModelList,
    TokenizeResponse,
    Usage,
    documented,
)

FAILURES = {400, 401, 403, 404, 413, 429, 503}
# Each route with a body: its request model and the model of its 200 answer.
ROUTES = {"/v1/completions": ("CompletionRequest", "CompletionResponse"),
          "/v1/chat/completions": ("ChatCompletionRequest", "ChatCompletionResponse"),
          "/v1/embeddings": ("EmbeddingRequest", "EmbeddingResponse"),
          "/tokenize": ("TokenizeRequest", "TokenizeResponse"), "/detokenize": ("DetokenizeRequest", "DetokenizeResponse"),
          "/v1/load_lora_adapter": ("LoadLoraAdapterRequest", "LoraAdapterStatus"),
          "/v1/unload_lora_adapter": ("UnloadLoraAdapterRequest", "LoraAdapterStatus"),
          "/v1/recommend": ("RecommendRequest", "RecommendResponse")}


def test_documented_declares_the_body_and_every_failure():
    doc = documented(None, ModelList)
    assert set(doc) == {"responses"} and set(doc["responses"]) == {200} | FAILURES
    assert doc["responses"][200] == {"model": ModelList}
    for code in FAILURES:
        assert doc["responses"][code]["model"] is ErrorResponse and doc["responses"][code]["description"]
    assert "error.param" in doc["responses"][400]["description"]


def test_documented_refers_to_the_request_schema_by_name():
    doc = documented(TokenizeRequest, TokenizeResponse)
    assert doc["openapi_extra"] == {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/TokenizeRequest"}}}}}
    assert doc["responses"] == documented(None, TokenizeResponse)["responses"]


@pytest.fixture(scope="module")
def spec():
    with TestClient(build_app(ServerConfig(model_name="m"), None, None)) as c:
        return c.get("/openapi.json").json()


def ref(answer: dict) -> str:
    return answer["content"]["application/json"]["schema"]["$ref"].removeprefix("#/components/schemas/")


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_the_document_gives_each_route_its_request_and_answers(spec, path):
    request, response = ROUTES[path]
    op = spec["paths"][path]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{request}"
    assert ref(op["responses"]["200"]) == response and response in spec["components"]["schemas"]
    assert {ref(op["responses"][str(code)]) for code in FAILURES} == {"ErrorResponse"}


def test_the_models_route_declares_the_model_list(spec):
    assert ref(spec["paths"]["/v1/models"]["get"]["responses"]["200"]) == "ModelList"
    assert "requestBody" not in spec["paths"]["/v1/models"]["get"]


def test_an_api_error_body_is_an_error_response():
    body = APIError(408, "too late", code="timeout").body()
    assert ErrorResponse.model_validate(body) == ErrorResponse(
        error=ErrorBody(message="too late", type="timeout_error", param=None, code="timeout"))


def test_usage_without_completion_tokens_counts_none():
    assert Usage(prompt_tokens=3, total_tokens=3).completion_tokens == 0  # an embedding's usage


def test_the_object_fields_take_only_their_literal():
    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "hi"}], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    parsed = CompletionResponse.model_validate(body)
    assert parsed.choices[0].finish_reason is None and parsed.choices[0].logprobs is None
    with pytest.raises(ValidationError):
        CompletionResponse.model_validate({**body, "object": "chat.completion"})
    with pytest.raises(ValidationError):
        LoraAdapterStatus(lora_name="a", status="loading")
