"""serve/protocol.py: the request bodies the official `openai` client sends (caught in process by a transport, no
server) parse field by field and convert to the SamplingParams worked out by hand; OpenAI's defaults; wrong types
and unserved or conflicting options refused naming the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.structured import StructuredOutputs
from lmkernel.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                     EmbeddingRequest, LoadLoraAdapterRequest, RecommendRequest, TokenizeRequest)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
THING = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name"]}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class _Sent(Exception):
    pass


def sent(call: Callable[[Any], object]) -> dict[str, Any]:
    """The JSON body the official client sends for `call(client)`: its transport keeps the body and fails the call."""
    import httpx
    import openai

    bodies = []

    def keep(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        raise _Sent

    client = openai.OpenAI(base_url="http://lmkernel.test/v1", api_key="k", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(keep)))
    with pytest.raises(openai.APIConnectionError):
        call(client)
    (body,) = bodies
    return body


def refused(model: type[BaseModel], body: dict[str, Any]) -> tuple[set[str], str]:
    """The fields a ValidationError names first in each error, and its messages joined."""
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    errors = err.value.errors()
    return {str(e["loc"][0]) for e in errors}, " | ".join(e["msg"] for e in errors)


def api_error(call: Callable[[], object]) -> APIError:
    with pytest.raises(APIError) as err:
        call()
    return err.value


def test_the_client_s_chat_body_parses_and_converts_by_hand():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = sent(lambda c: c.chat.completions.create(
        model="m", messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "22 C"}],
        n=2, stop=["\n\n", "END"], temperature=0, top_p=0.5, presence_penalty=0.5, frequency_penalty=-0.5, seed=7,
        max_completion_tokens=30, logprobs=True, top_logprobs=3, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        user="u-1", metadata={"team": "a"}, store=False,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2,
                    "stop_token_ids": [7]}))
    request = ChatCompletionRequest.model_validate(body)
    assert [m.role for m in request.messages] == ["developer", "user", "assistant", "tool"]
    assert [m.text() for m in request.messages] == ["Be brief.", "Weather in Paris?", "", "22 C"]
    assert request.messages[2].tool_calls == [call] and request.messages[3].tool_call_id == "c1"
    assert (request.tools, request.tool_choice, request.parallel_tool_calls) == (
        [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False)
    assert (request.max_completion_tokens, request.max_tokens, request.logprobs, request.top_logprobs) == (30, None, True, 3)
    params, constrained_by = request.sampling_params(30, 3)
    assert constrained_by is None
    assert params == SamplingParams(n=2, max_tokens=30, min_tokens=2, temperature=0.0, top_p=0.5, top_k=5, min_p=0.1,
                                    presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1, seed=7,
                                    stop=["\n\n", "END"], stop_token_ids=[7], ignore_eos=True, logprobs=3)


def test_the_client_s_json_schema_format_is_the_schema_to_enforce():
    body = sent(lambda c: c.chat.completions.create(
        model="m", messages=CHAT["messages"],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": THING, "strict": True}}))
    request = ChatCompletionRequest.model_validate(body)
    assert (request.response_format.json_schema.name, request.response_format.json_schema.strict) == ("thing", True)
    assert request.constraint() == ("response_format", {"json": THING})
    params, constrained_by = request.sampling_params(None, None)
    assert (params.structured_outputs, constrained_by) == (StructuredOutputs(json=THING), "response_format")


def test_the_client_s_streamed_completion_body_parses_and_converts_by_hand():
    body = sent(lambda c: c.completions.create(
        model="m", prompt=[[1, 2, 3], [4]], max_tokens=5, logprobs=2, echo=True, stop="\n", seed=3, best_of=1,
        stream=True, stream_options={"include_usage": True}))
    request = CompletionRequest.model_validate(body)
    assert (request.prompt, request.echo, request.stream, request.stream_options.include_usage) == ([[1, 2, 3], [4]], True,
                                                                                                   True, True)
    params, constrained_by = request.sampling_params(request.max_tokens, request.logprobs)
    assert (params, constrained_by) == (SamplingParams(max_tokens=5, logprobs=2, stop=["\n"], seed=3), None)


def test_the_client_s_embedding_bodies_parse():
    request = EmbeddingRequest.model_validate(sent(lambda c: c.embeddings.create(model="e", input=["a", "b"], dimensions=64)))
    assert (request.input, request.dimensions, request.encoding_format) == (["a", "b"], 64, "base64")  # the client's default
    request = EmbeddingRequest.model_validate(sent(lambda c: c.embeddings.create(model="e", input=[[1, 2], [3]],
                                                                                  encoding_format="float")))
    assert (request.input, request.dimensions, request.encoding_format) == ([[1, 2], [3]], None, "float")


def test_nulls_the_client_sends_for_options_left_unset_are_the_defaults():
    """OpenAI's n, stream, logprobs and echo are nullable: the client sends null for None, and null is the default."""
    chat = sent(lambda c: c.chat.completions.create(model="m", messages=CHAT["messages"], n=None, stream=None,
                                                    logprobs=None, temperature=None, stop=None, seed=None))
    assert chat["n"] is None and chat["stream"] is None and chat["logprobs"] is None
    request = ChatCompletionRequest.model_validate(chat)
    assert (request.n, request.stream, request.logprobs) == (1, False, False)
    assert request.sampling_params(None, None)[0] == SamplingParams(max_tokens=None)
    completion = sent(lambda c: c.completions.create(model="m", prompt="x", n=None, echo=None, stream=None, logprobs=None))
    request = CompletionRequest.model_validate(completion)
    assert (request.n, request.echo, request.stream, request.logprobs, request.max_tokens) == (1, False, False, None, 16)


def test_defaults_are_openai_s():
    """Chat: n 1, temperature 1, top_p 1, no penalties, no stop, no stream or usage, no log-probs, no length limit;
    completions: 16 tokens, no echo. A value sent is judged as sent: temperature 0 is greedy, top_p 0 refused."""
    chat = ChatCompletionRequest.model_validate(CHAT)
    assert (chat.n, chat.stream, chat.stream_options, chat.logprobs, chat.top_logprobs, chat.max_tokens,
            chat.max_completion_tokens, chat.tools, chat.tool_choice, chat.response_format) == (
        1, False, None, False, None, None, None, None, None, None)
    assert chat.sampling_params(None, None) == (SamplingParams(n=1, max_tokens=None, temperature=1.0, top_p=1.0, top_k=0,
                                                               min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                                                               repetition_penalty=1.0, stop=[]), None)
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert (completion.max_tokens, completion.echo, completion.logprobs) == (16, False, None)
    streamed = ChatCompletionRequest.model_validate({**CHAT, "stream": True, "stream_options": {}})
    assert streamed.stream_options.include_usage is False
    assert ChatCompletionRequest.model_validate({**CHAT, "temperature": 0}).sampling_params(None, None)[0].temperature == 0.0
    with pytest.raises(ValueError, match=r"SamplingParams.top_p must be in \(0, 1\]; got 0.0"):
        ChatCompletionRequest.model_validate({**CHAT, "top_p": 0}).sampling_params(None, None)


@pytest.mark.parametrize(("model", "body", "field", "expected"), [
    (ChatCompletionRequest, {**CHAT, "n": "two"}, "n", "Input should be a valid integer"),
    (ChatCompletionRequest, {**CHAT, "stop": 5}, "stop", "Input should be a valid string"),
    (ChatCompletionRequest, {**CHAT, "temperature": "hot"}, "temperature", "Input should be a valid number"),
    (ChatCompletionRequest, {**CHAT, "logprobs": "sure"}, "logprobs", "Input should be a valid boolean"),
    (ChatCompletionRequest, {**CHAT, "response_format": {"type": "xml"}}, "response_format",
     "Input should be 'text', 'json_object' or 'json_schema'"),
    (ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": "maybe"}}, "stream_options",
     "Input should be a valid boolean"),
    (ChatCompletionRequest, {**CHAT, "tools": {"type": "function"}}, "tools", "Input should be a valid list"),
    (ChatCompletionRequest, {"model": "m", "messages": "hi"}, "messages", "Input should be a valid list"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages",
     "Input should be 'system', 'user', 'assistant', 'developer' or 'tool'"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages", "Input should be 'text'"),
    (CompletionRequest, {"model": "m", "prompt": 5}, "prompt", "Input should be a valid string"),
    (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": "ten"}, "max_tokens", "Input should be a valid integer"),
    (CompletionRequest, {"model": "m", "prompt": "x", "echo": "loud"}, "echo", "Input should be a valid boolean"),
    (CompletionRequest, {"prompt": "x"}, "model", "Field required"),
    (EmbeddingRequest, {"model": "e", "input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    (EmbeddingRequest, {"model": "e", "input": "x", "encoding_format": "int8"}, "encoding_format",
     "Input should be 'float' or 'base64'"),
])
def test_wrong_types_are_refused_naming_the_field(model, body, field, expected):
    fields, messages = refused(model, body)
    assert fields == {field} and expected in messages, messages


@pytest.mark.parametrize(("field", "asks", "no_op"), [
    ("logit_bias", {"42": 5}, {}), ("best_of", 3, 1), ("suffix", "end", ""), ("functions", [{"name": "f"}], []),
    ("function_call", {"name": "f"}, "auto"), ("audio", {"voice": "alloy", "format": "wav"}, None),
    ("prediction", {"type": "content", "content": "x"}, None), ("modalities", ["text", "audio"], ["text"]),
])
def test_options_asking_for_what_is_not_served_are_refused_and_their_no_op_values_pass(field, asks, no_op):
    for model, body in ((ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m", "prompt": "x"})):
        error = api_error(lambda: model.model_validate({**body, field: asks}))
        assert (error.status, error.param, error.message) == (
            400, field, f"{field} is not supported by this server; leave it out")
        model.model_validate({**body, field: no_op, "user": "u", "metadata": {"a": "b"}, "store": True})


@pytest.mark.parametrize(("extra", "field", "structured"), [
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, "response_format", StructuredOutputs(json_object=True)),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs", StructuredOutputs(regex="[0-9]+")),
    ({"guided_json": THING}, "guided_json", StructuredOutputs(json=THING)),
    ({"guided_regex": "a|b"}, "guided_regex", StructuredOutputs(regex="a|b")),
    ({"guided_choice": ["yes", "no"]}, "guided_choice", StructuredOutputs(choice=("yes", "no"))),
    ({"guided_grammar": 'start: "x"'}, "guided_grammar", StructuredOutputs(grammar='start: "x"')),
])
def test_each_constraint_field_becomes_its_structured_output(extra, field, structured):
    params, constrained_by = ChatCompletionRequest.model_validate({**CHAT, **extra}).sampling_params(4, None)
    assert (params.structured_outputs, constrained_by, params.max_tokens) == (structured, field, 4)


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format of type json_schema needs json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "response_format and guided_regex each constrain the output: send one"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs",
     "structured_outputs has unknown fields jsn; expected one of json, regex, choice, grammar, json_object"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice",
     "structured_outputs.choice must be a non-empty list of non-empty strings"),
    ({"guided_choice": []}, "guided_choice", "structured_outputs.choice must be a non-empty list of non-empty strings"),
])
def test_constraints_that_cannot_be_enforced_are_refused_naming_the_request_s_field(extra, param, message):
    request = ChatCompletionRequest.model_validate({**CHAT, **extra})
    error = api_error(lambda: request.sampling_params(4, None))
    assert (error.status, error.param, error.message) == (400, param, message)


def test_a_forced_tool_call_is_its_grammar_and_refused_beside_another_constraint():
    request = ChatCompletionRequest.model_validate({**CHAT, "tools": [WEATHER], "tool_choice": "required"})
    params, constrained_by = request.sampling_params(8, None, forced=("required", 'start: "call"'))
    assert (params.structured_outputs, constrained_by) == (StructuredOutputs(grammar='start: "call"'), "tools")
    both = ChatCompletionRequest.model_validate({**CHAT, "response_format": {"type": "json_object"}})
    error = api_error(lambda: both.sampling_params(8, None, forced=("required", 'start: "call"')))
    assert (error.status, error.param, error.message) == (
        400, "response_format", "tool_choice 'required' and response_format each constrain the output: send one")


def test_a_message_s_text_is_its_string_or_its_parts_joined():
    assert ChatMessage(role="assistant").text() == ""
    assert ChatMessage(role="user", content="hi").text() == "hi"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert ChatMessage.model_validate({"role": "user", "content": parts, "refusal": None}).text() == "ab"


def test_the_other_request_bodies():
    assert TokenizeRequest.model_validate({"prompt": "x"}).model_dump() == {
        "model": None, "prompt": "x", "messages": None, "add_special_tokens": True, "add_generation_prompt": True,
        "return_token_strs": False}
    assert refused(DetokenizeRequest, {"tokens": ["a"]}) == ({"tokens"}, "Input should be a valid integer, unable to parse "
                                                                         "string as an integer")
    assert refused(LoadLoraAdapterRequest, {"lora_name": "a"}) == ({"lora_path"}, "Field required")
    assert RecommendRequest.model_validate({"user": "u"}).model_dump() == {"user": "u", "k": 10, "time": None}
    assert refused(RecommendRequest, {"user": "u", "k": 0}) == ({"k"}, "Input should be greater than or equal to 1")
    assert refused(RecommendRequest, {"user": "u", "k": 1001}) == ({"k"}, "Input should be less than or equal to 1000")
    assert refused(RecommendRequest, {"user": ""}) == ({"user"}, "String should have at least 1 character")
    assert refused(RecommendRequest, {"user": "u", "limit": 3}) == ({"limit"}, "Extra inputs are not permitted")


def test_an_api_error_answers_openai_s_error_type_for_its_status():
    types = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
             500: "server_error", 502: "server_error"}
    for status, kind in types.items():
        error = APIError(status, "no", "n", "c", {"Retry-After": "1"})
        assert error.body() == {"error": {"message": "no", "type": kind, "param": "n", "code": "c"}}
        assert (str(error), error.status, error.headers) == ("no", status, {"Retry-After": "1"})
