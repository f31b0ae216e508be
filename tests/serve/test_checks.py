"""The request checks, through the app in-process (no server): sampling values are judged by SamplingParams
alone, the engine fills the default max_tokens that admission charges, a forced tool call and another
constraint are refused together, and every refusal names the field the client sent."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmkernel.config import EngineConfig
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.sampling import SamplingParams
from lmkernel.serve.app import ServerConfig, build_app

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


def engine_for(smollm) -> AsyncEngine:
    """An engine of its own for each app: its step loop runs on the app's event loop."""
    return AsyncEngine.build(smollm, EngineConfig(kv_cache_memory="16MiB", max_model_len=64))


def app_client(smollm, **config) -> TestClient:
    return TestClient(build_app(ServerConfig(model_name=MODEL, **config), engine_for(smollm), None))


@pytest.fixture(scope="module")
def client(smollm):
    with app_client(smollm) as c:
        yield c


def refused(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


@pytest.mark.parametrize(("field", "value"), [("temperature", 150.0), ("top_p", 0), ("top_k", -2), ("min_p", 1.5),
                                              ("presence_penalty", 3), ("repetition_penalty", 0), ("min_tokens", -1),
                                              ("seed", 2**64), ("n", 0), ("stop", [""])])
def test_sampling_bounds_are_those_of_sampling_params(client, field, value):
    """The server refuses exactly what `SamplingParams` refuses, with its words, naming the request's field."""
    with pytest.raises(ValueError) as engine_says:
        SamplingParams(**{field: value})
    expected = str(engine_says.value).removeprefix("SamplingParams.").split("; got")[0]  # the value as JSON parsed it
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        assert refused(client.post(path, json={**body, field: value}), field).split("; got")[0] == expected


def test_a_value_sampling_params_accepts_is_served(client):
    """Temperature 5 is within SamplingParams' bounds (OpenAI's stop at 2): served, not refused by a second rule."""
    SamplingParams(temperature=5.0)
    assert client.post("/v1/completions", json={**COMPLETION, "temperature": 5.0, "seed": 1}).status_code == 200


def test_fields_spelled_otherwise_are_named_as_sent(client):
    assert "0..20" in refused(client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 50}),
                              "top_logprobs")
    refused(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": None, "max_completion_tokens": 0}),
            "max_completion_tokens")
    refused(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}), "max_tokens")
    refused(client.post("/v1/completions", json={**COMPLETION, "logprobs": 21}), "logprobs")


def test_the_server_caps_n(client):
    assert "at most 16" in refused(client.post("/v1/completions", json={**COMPLETION, "n": 17}), "n")


def test_a_forced_tool_call_and_another_constraint_are_refused_together(smollm):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    body = {**CHAT, "tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}
    with app_client(smollm, tool_call_parser="hermes") as client:  # SmolLM2's template renders no tools of its own
        assert "each constrain the output" in refused(client.post("/v1/chat/completions", json=body), "response_format")


def test_admission_charges_the_max_tokens_the_engine_fills_in(smollm):
    """Without max_tokens, a request may take the rest of its context (64 tokens here): the engine fills that in,
    and the key's tokens-per-minute budget is charged for it, so a second such request waits (429)."""
    prompt = smollm.tokenizer.encode("Hello")
    filled = engine_for(smollm).check_prompt(prompt, SamplingParams(max_tokens=None)).params.max_tokens
    assert filled == 64 - len(prompt)
    with app_client(smollm, tokens_per_minute=100) as c:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": None, "temperature": 0}
        assert c.post("/v1/completions", json={**body, "max_tokens": 1}).status_code == 200
        first = c.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        second = c.post("/v1/completions", json=body)
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
