"""Tool calls through a real `lmk serve` of Qwen2.5-Coder-0.5B-Instruct and the official `openai` client:
tool_choice auto, required and named, streamed and not, and a tool result fed back for a final answer."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow  # a real server: `make test` runs it, `make test-fast` does not

MODEL = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current local time in a time zone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]




def check_call(name: str, arguments: str) -> dict:
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    args = json.loads(arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def create(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model=MODEL, max_tokens=120, temperature=0, **kwargs)


def test_auto_calls_the_tool_a_question_needs(qwen_client: openai.OpenAI) -> None:
    choice = create(qwen_client, messages=ASK, tools=[WEATHER, TIME]).choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert check_call(call.function.name, call.function.arguments)["city"] == "Paris"


def test_auto_answers_in_text_when_no_tool_fits(qwen_client: openai.OpenAI) -> None:
    choice = create(qwen_client, messages=[{"role": "user", "content": "Write a haiku about the sea."}], tools=[WEATHER]).choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls and choice.message.content


@pytest.mark.parametrize("stream", [False, True])
def test_required_forces_a_valid_call(qwen_client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "Tell me a joke."}]  # nothing asks for a tool: the grammar makes one
    if not stream:
        choice = create(qwen_client, messages=messages, tools=[WEATHER, TIME], tool_choice="required").choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments)
        return
    calls: dict[int, dict] = {}
    finish = None
    for chunk in create(qwen_client, messages=messages, tools=[WEATHER, TIME], tool_choice="required", stream=True):
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: its id and name
                assert piece.index not in calls and piece.function.name
                calls[piece.index] = {"name": piece.function.name, "arguments": piece.function.arguments or ""}
            else:
                calls[piece.index]["arguments"] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for call in calls.values():
        check_call(call["name"], call["arguments"])


def test_named_function_is_the_one_called(qwen_client: openai.OpenAI) -> None:
    choice = create(qwen_client, messages=ASK, tools=[WEATHER, TIME],
                    tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "get_time"
    check_call("get_time", call.function.arguments)


def test_none_answers_in_text(qwen_client: openai.OpenAI) -> None:
    choice = create(qwen_client, messages=ASK, tools=[WEATHER], tool_choice="none").choices[0]
    assert not choice.message.tool_calls and choice.message.content


def test_a_tool_result_fed_back_gets_a_final_answer(qwen_client: openai.OpenAI) -> None:
    first = create(qwen_client, messages=ASK, tools=[WEATHER], tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    history = [*ASK, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 23, "sky": "sunny"})}]
    final = create(qwen_client, messages=history, tools=[WEATHER]).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "23" in final.message.content and "sunny" in final.message.content.lower()
