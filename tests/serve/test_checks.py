"""The request checks, through the app in-process (no server): sampling values are judged by SamplingParams
alone, the engine fills the default max_tokens that admission charges, a forced tool call and another
constraint are refused together, and every refusal names the field the client sent."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, RootModel, ValidationError

from lmkernel.config import EngineConfig
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.sampling import SamplingParams
from lmkernel.serve.app import ServerConfig, build_app
from lmkernel.serve.protocol import APIError

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


# -- the checks one by one, without a model --------------------------------------------------------


class StubEngine:
    """What `Service` reads of an engine: its counters, the adapters it serves, and its check of a prompt (here:
    max_tokens filled in as 10 when unset, or the refusal it is given)."""

    def __init__(self, lora_names=(), refusal: Exception | None = None) -> None:
        self.lora_names, self.refusal, self.tokenizer = list(lora_names), refusal, object()

    def stats(self) -> dict:
        from lmkernel.serve.metrics import STEP_PHASES

        return {"running": 3, "waiting": 2, "kv_blocks_free": 6, "kv_blocks_total": 8, "prefix_cache_hit_rate": 0.5,
                "preemptions": 0, "step_prefill_steps": 0, "step_decode_steps": 0, "step_prompt_tokens": 0,
                "step_decode_tokens": 0, **{f"step_{p}_seconds": 0.0 for p in STEP_PHASES}}

    def check_prompt(self, ids, params):
        import dataclasses

        from lmkernel.engine.request import CheckedPrompt

        if self.refusal is not None:
            raise self.refusal
        return CheckedPrompt(tuple(ids), dataclasses.replace(params, max_tokens=params.max_tokens or 10))


def stub_service(engine=None, embedder=None, **config):
    from lmkernel.serve.checks import Service

    return Service(ServerConfig(**{"model_name": MODEL, "embedding_model_name": "e", **config}), engine, embedder)


def api_error(call) -> APIError:
    with pytest.raises(APIError) as err:
        call()
    return err.value


def http_request(body: bytes = b"{}", headers: dict[str, str] | None = None):
    from fastapi import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.lower().encode(), v.encode())
                                                                        for k, v in (headers or {}).items()]}
    return Request(scope, receive)


class Point(BaseModel):
    x: int
    tags: dict[str, list[int]] = {}
    items: list[dict[str, int]] = []


def parsed(svc, body: bytes, headers: dict[str, str] | None = None, model=Point):
    import asyncio

    return asyncio.run(svc.parse(http_request(body, headers), model))


def test_served_models_are_the_generator_its_adapters_and_the_embedder():
    svc = stub_service(StubEngine(["sql", "chat"]), embedder=object())
    assert svc.served() == ["m", "m:sql", "m:chat", "e"] and svc.adapters() == {"m:sql": "sql", "m:chat": "chat"}
    assert stub_service(None, embedder=object()).served() == ["e"] and stub_service(None, object()).adapters() == {}
    assert stub_service(StubEngine(["sql"])).served() == ["m", "m:sql"]
    assert stub_service(StubEngine(["sql"]), model_name=None).adapters() == {}


def test_check_model_names_the_adapter_and_refuses_what_a_model_cannot_do():
    svc = stub_service(StubEngine(["sql"]), embedder=object())
    assert svc.check_model("m", "generate") is None and svc.check_model("m:sql", "generate") == "sql"
    assert svc.check_model("e", "embed") is None
    for name, kind, does in (("m", "embed", "embeddings"), ("m:sql", "embed", "embeddings"), ("e", "generate", "completions")):
        error = api_error(lambda: svc.check_model(name, kind))
        assert (error.status, error.param, error.message) == (400, "model", f"model '{name}' cannot serve {does}")
    error = api_error(lambda: svc.check_model("gpt-4", "generate"))
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert error.message == "model 'gpt-4' does not exist; served: m, m:sql, e"


def test_the_generator_is_the_engine_or_a_404():
    engine = StubEngine()
    assert stub_service(engine).generator() is engine and stub_service(engine).tokenizer is engine.tokenizer
    error = api_error(lambda: stub_service(None, object()).generator())
    assert (error.status, error.param, error.message) == (404, "model", "this server serves no generation model")


def test_metrics_read_the_engine_and_readiness_follows_draining():
    svc = stub_service(StubEngine())
    value = svc.metrics.registry.get_sample_value
    assert value("lmkernel_num_requests_running") == 3.0 and value("lmkernel_kv_cache_usage_ratio") == 0.25
    assert value("lmkernel_ready") == 1.0
    svc.state.draining = True
    assert value("lmkernel_ready") == 0.0


def test_the_callers_key_is_checked_from_the_authorization_header():
    svc = stub_service(StubEngine(), api_keys=["k1", "k2"])
    assert svc.authenticate(http_request(headers={"Authorization": "Bearer k2"})) == "k2"
    assert api_error(lambda: svc.authenticate(http_request())).status == 401
    assert stub_service(StubEngine()).authenticate(http_request()) is None


def test_parse_reads_the_body_as_the_model():
    svc = stub_service(StubEngine(), max_body_bytes=8)
    assert parsed(svc, b'{"x":12}', {"content-length": "abc"}) == Point(x=12)  # exactly 8 bytes: the limit is allowed
    assert parsed(svc, b'{"x":1}', {"content-length": "7"}) == Point(x=1)
    assert parsed(svc, b'{"x":12}', {"content-length": "8"}) == Point(x=12)


def test_a_body_past_the_limit_is_refused_by_its_declared_or_its_actual_size():
    svc = stub_service(StubEngine(), max_body_bytes=8)
    error = api_error(lambda: parsed(svc, b'{"x":1}', {"content-length": "9"}))
    assert (error.status, error.message) == (413, "request body of 9 bytes exceeds the limit of 8 bytes")
    error = api_error(lambda: parsed(svc, b'{"x": 123}'))
    assert (error.status, error.message) == (413, "request body of 10 bytes exceeds the limit of 8 bytes")


def test_a_body_that_is_not_a_json_object_is_refused():
    import json

    svc = stub_service(StubEngine())
    with pytest.raises(json.JSONDecodeError) as bad:
        json.loads(b'{"x": ')
    error = api_error(lambda: parsed(svc, b'{"x": '))
    assert (error.status, error.message) == (400, f"malformed JSON body: {bad.value}")
    assert api_error(lambda: parsed(svc, b"\xff\xfe{")).message.startswith("malformed JSON body: ")
    error = api_error(lambda: parsed(svc, b"[1]"))
    assert (error.status, error.message) == (400, "the JSON body must be an object")
    error = api_error(lambda: parsed(svc, b'{"x": "one"}'))
    assert (error.status, error.param, error.message) == (400, "x", "x: Input should be a valid integer, unable to parse "
                                                                    "string as an integer")


def test_validation_errors_name_the_first_field_and_a_message_by_its_index():
    from lmkernel.serve.checks import validation_error
    from lmkernel.serve.protocol import ChatCompletionRequest

    def named(model, data) -> tuple[str | None, str]:
        with pytest.raises(ValidationError) as err:
            model.model_validate(data)
        error = validation_error(err.value)
        assert error.status == 400
        return error.param, error.message

    roles = "Input should be 'system', 'user', 'assistant', 'developer' or 'tool'"
    messages = [{"role": "user", "content": "hi"}, {"role": "robot"}]
    assert named(ChatCompletionRequest, {"model": "m", "messages": messages}) == ("messages[1].role",
                                                                                   f"messages[1].role: {roles}")
    assert named(ChatCompletionRequest, {"model": 5, "messages": messages}) == ("model",
                                                                                "model: Input should be a valid string")
    assert named(ChatCompletionRequest, {"model": "m"}) == ("messages", "messages: Field required")
    assert named(Point, {"x": 1, "tags": {"a": ["b"]}})[0] == "tags"  # a path of three, not under messages
    assert named(Point, {"x": 1, "items": [{"k": "v"}]})[0] == "items"
    assert named(RootModel[int], "seven") == (None, "body: Input should be a valid integer, unable to parse string as an "
                                                    "integer")


def test_inputs_take_openais_four_forms():
    from lmkernel.serve.checks import inputs

    assert inputs("hi", "prompt") == ["hi"] and inputs(["a", "b"], "prompt") == ["a", "b"]
    assert inputs([1, 2], "prompt") == [[1, 2]] and inputs([[1], [2, 3]], "input") == [[1], [2, 3]]
    error = api_error(lambda: inputs([], "input"))
    assert (error.status, error.param, error.message) == (400, "input", "input must not be empty")


def test_engine_errors_become_400s_naming_the_field():
    from lmkernel.engine.structured import StructuredOutputError
    from lmkernel.errors import ContextLengthError
    from lmkernel.serve.checks import engine_error

    bad_regex = StructuredOutputError("bad regex", "structured_outputs.regex")
    for param, named in ((None, "structured_outputs.regex"), ("structured_outputs", "structured_outputs.regex"),
                         ("response_format", "response_format")):
        error = engine_error(bad_regex, param)
        assert (error.status, error.message, error.param, error.code) == (400, "bad regex", named, None)
    error = engine_error(ContextLengthError("too long"), "messages")
    assert (error.status, error.message, error.param, error.code) == (400, "too long", "messages", "context_length_exceeded")
    error = engine_error(ValueError("token 70000 out of range"), "prompt")
    assert (error.status, error.message, error.param, error.code) == (400, "token 70000 out of range", "prompt", None)


def test_sampling_passes_the_routes_max_tokens_logprobs_and_forced_call():
    from lmkernel.serve.checks import sampling
    from lmkernel.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({**CHAT, "temperature": 0.5})
    params, constrained_by = sampling(body, 7, 3)
    assert (params.max_tokens, params.logprobs, params.temperature, constrained_by) == (7, 3, 0.5, None)
    params, constrained_by = sampling(body, 7, None, ("required", 'start: "x"'))
    assert (params.structured_outputs.grammar, params.logprobs, constrained_by) == ('start: "x"', None, "tools")


def test_sampling_refusals_name_the_field_as_the_request_spells_it():
    from lmkernel.serve.checks import sampling
    from lmkernel.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({**CHAT, "top_p": 0})
    error = api_error(lambda: sampling(body, 7, None))
    assert (error.status, error.param, error.message) == (400, "top_p", "top_p must be in (0, 1]; got 0.0")
    body = ChatCompletionRequest.model_validate(CHAT)
    error = api_error(lambda: sampling(body, 7, 50, names={"logprobs": "top_logprobs"}))
    assert (error.param, error.message) == ("top_logprobs", "top_logprobs must be None or 0..20; got 50")
    error = api_error(lambda: sampling(body, 0, None, names={"logprobs": "top_logprobs"}))
    assert (error.param, error.message) == ("max_tokens", "max_tokens must be an integer >= 1 or None; got 0")


def test_admit_checks_every_prompt_and_charges_the_keys_tokens():
    svc = stub_service(StubEngine(), tokens_per_minute=1000, max_n=2)
    checked = svc.admit("key", [[1, 2, 3], [4]], SamplingParams(max_tokens=None, n=2), "prompt")
    assert [(c.ids, c.params.max_tokens) for c in checked] == [((1, 2, 3), 10), ((4,), 10)]
    assert svc.gate.buckets["key"][1].level == 1000 - (3 + 20) - (1 + 20)


def test_admit_refuses_more_choices_than_the_server_allows():
    svc = stub_service(StubEngine(), max_n=2)
    error = api_error(lambda: svc.admit(None, [[1]], SamplingParams(n=3), "prompt"))
    assert (error.status, error.param, error.message) == (400, "n", "n must be at most 2 on this server; got 3")


def test_admit_names_the_field_of_a_prompt_the_engine_refuses():
    from lmkernel.errors import ContextLengthError

    svc = stub_service(StubEngine(refusal=ContextLengthError("prompt of 70 tokens is too long")))
    error = api_error(lambda: svc.admit(None, [[1]], SamplingParams(), "messages"))
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    assert error.message == "prompt of 70 tokens is too long"


def test_admit_refuses_past_the_queue_limit_with_retry_after():
    svc = stub_service(StubEngine(), max_queued_requests=2)
    svc.state.generating = 1
    assert len(svc.admit(None, [[1]], SamplingParams(), "prompt")) == 1
    svc.state.generating = 2
    error = api_error(lambda: svc.admit(None, [[1]], SamplingParams(), "prompt"))
    assert (error.status, error.code) == (429, "queue_full")
    assert {k.lower(): v for k, v in error.headers.items()} == {"retry-after": "1"}  # header names are case-insensitive
    assert error.message == "the server is at its limit of 2 requests; retry later"


def test_the_request_rate_limit_is_the_configured_one():
    svc = stub_service(StubEngine(), requests_per_minute=1)
    svc.admit("key", [[1]], SamplingParams(), "prompt")
    assert api_error(lambda: svc.admit("key", [[1]], SamplingParams(), "prompt")).code == "rate_limit_exceeded"
