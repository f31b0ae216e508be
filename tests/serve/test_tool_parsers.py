"""Tool-call parsers on model output as Qwen2.5 (Hermes) and Llama 3 write it, whole and streamed in pieces: choosing
the parser, what plan_tools refuses, and both parsers on recorded outputs (each parser alone: tests/serve/tool_parsers/)."""

from __future__ import annotations

import json

import pytest

from lmkernel.serve.protocol import APIError, ChatMessage
from lmkernel.serve.tool_parsers import parser_for_template
from lmkernel.serve.tool_parsers.hermes import HermesParser
from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser
from lmkernel.serve.tools import plan_tools, template_messages
from tool_streams import streamed

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_parser_follows_the_template() -> None:
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert parser_for_template("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert parser_for_template("{{ messages }}") is None


@pytest.mark.parametrize(("tools", "choice", "template", "param"), [
    ([WEATHER], None, "{{ messages }}", "tools"),
    ([{"type": "function", "function": {"name": "no spaces"}}], None, "<tool_call>tools", "tools[0].function.name"),
    ([{"type": "retrieval"}], None, "<tool_call>tools", "tools[0]"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "<tool_call>tools", "tool_choice"),
    ([WEATHER], "sometimes", "<tool_call>tools", "tool_choice"),
    (None, "required", "<tool_call>tools", "tool_choice"),
    ([WEATHER, WEATHER], None, "<tool_call>tools", "tools"),
])
def test_what_cannot_be_served_names_the_field(tools, choice, template, param) -> None:
    with pytest.raises(APIError) as err:
        plan_tools(tools, choice, template, None)
    assert err.value.status == 400 and err.value.param == param


def test_history_arguments_become_objects_for_the_template() -> None:
    messages = [ChatMessage(role="assistant", content=None, tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
        ChatMessage(role="tool", content="22 C", tool_call_id="c1")]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and out[1]["tool_call_id"] == "c1"
    with pytest.raises(APIError) as err:
        template_messages([ChatMessage(role="assistant", tool_calls=[{"function": {"name": "f", "arguments": "{x"}}])])
    assert err.value.param == "messages[0].tool_calls[0].function.arguments"


def test_parallel_tool_calls_false_forces_exactly_one_call() -> None:
    tools = [WEATHER, {"type": "function", "function": {"name": "get_time"}}]
    assert plan_tools(tools, "required", "<tool_call>tools", None).grammar.startswith("start: call+")
    assert plan_tools(tools, "required", "<tool_call>tools", None, parallel=False).grammar.startswith("start: call\n")


# Outputs of Qwen2.5-Coder-0.5B/1.5B-Instruct to chat requests offering get_weather and get_time, and texts built
# like them: tagged calls, a bare and a fenced object, calls among text, a broken call, code, plain answers.
RECORDED = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
    '{"name": "get_weather", "arguments": {"city": "Tokyo"}}',
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Tokyo"\n  }\n}\n```',
    '```json\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n```\nThis calls the weather tool.',
    "I'll check that for you.\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',
    "```python\nimport requests\nprint(requests.get('https://wttr.in/Paris').text)\n```",
    "The weather in Paris is usually mild in spring, around 15 C.",
    '{"city": "Paris"}',
    '```json\n{"name": "book_flight", "arguments": {"to": "Oslo"}}\n```',
    "Use <tool_call> tags like <tool_call>this</tool_call> to call tools.",
    "",
    "   \n",
]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 10_000])
@pytest.mark.parametrize("make", [lambda: HermesParser(["get_weather", "get_time"]),
                                  lambda: Llama3JsonParser(["get_weather", "get_time"])], ids=["hermes", "llama3_json"])
def test_streamed_and_whole_outputs_are_read_the_same_way(make, step: int) -> None:
    for text in RECORDED:
        whole_content, whole_calls = make().parse(text)
        content, calls = streamed(make(), text, step)
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.name, c.arguments) for c in whole_calls], text
        assert (content.strip() or None if calls else content) == whole_content, text
