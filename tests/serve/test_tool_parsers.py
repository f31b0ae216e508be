"""Tool-call parsers on model output as Qwen2.5 (Hermes) and Llama 3 write it, whole and streamed in pieces."""

from __future__ import annotations

import json

import pytest

from lmkernel.serve.protocol import APIError, ChatMessage
from lmkernel.serve.tool_parsers import parser_for_template
from lmkernel.serve.tool_parsers.hermes import HermesParser
from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser
from lmkernel.serve.tools import plan_tools, template_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TWO_CALLS = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "opts": {"units": "C"}}}\n'
             '</tool_call>\n<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>')


def streamed(parser, text: str, step: int) -> tuple[str, dict[int, dict]]:
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    content, calls = "", {}
    for e in events:
        if e.index is None:
            content += e.content
        elif e.call_id is not None:
            assert e.index not in calls, "a call opens once, with its id and name"
            calls[e.index] = {"name": e.name, "arguments": ""}
        else:
            calls[e.index]["arguments"] += e.arguments
    return content, calls


def test_hermes_calls_and_the_text_around_them() -> None:
    content, calls = HermesParser().parse(TWO_CALLS)
    assert content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "opts": {"units": "C"}}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("step", [1, 2, 5, 17, 1000])
def test_hermes_stream_in_any_pieces_gives_the_same_calls(step: int) -> None:
    content, calls = streamed(HermesParser(), TWO_CALLS, step)
    assert content.strip() == "Checking both."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "opts": {"units": "C"}}), ("get_weather", {"city": "Oslo"})]


def test_hermes_unclosed_call_at_the_end_and_broken_call_as_text() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert HermesParser().parse(text)[1][0].arguments == '{"city": "Rome"}'
    assert json.loads(streamed(HermesParser(), text, 3)[1][0]["arguments"]) == {"city": "Rome"}
    broken = 'Try <tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert HermesParser().parse(broken) == (broken, [])
    assert HermesParser().parse("No calls here <tool") == ("No calls here <tool", [])
    assert streamed(HermesParser(), "No calls here <tool", 4) == ("No calls here <tool", {})


def test_llama3_json_calls() -> None:
    parser = Llama3JsonParser()
    content, calls = parser.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                                  '{"name": "get_weather", "parameters": {"city": "Quito"}}')
    assert content is None and [json.loads(c.arguments)["city"] for c in calls] == ["Lima", "Quito"]
    assert parser.parse("The weather is {unknown}") == ("The weather is {unknown}", [])
    assert streamed(Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Lima"}}', 4)[1] == {
        0: {"name": "get_weather", "arguments": '{"city": "Lima"}'}}


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


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_hermes_bare_object_naming_an_offered_tool_is_a_call(step: int) -> None:
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert HermesParser(["get_weather"]).parse(bare)[1][0].name == "get_weather"
    assert HermesParser(["get_time"]).parse(bare) == (bare, [])  # not an offered tool: text
    assert streamed(HermesParser(["get_weather"]), bare, step)[1] == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert streamed(HermesParser(["get_weather"]), "{braces} in text", step) == ("{braces} in text", {})


def test_parallel_tool_calls_false_forces_exactly_one_call() -> None:
    tools = [WEATHER, {"type": "function", "function": {"name": "get_time"}}]
    assert plan_tools(tools, "required", "<tool_call>tools", None).grammar.startswith("start: call+")
    assert plan_tools(tools, "required", "<tool_call>tools", None, parallel=False).grammar.startswith("start: call\n")


FENCED = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_a_fenced_object_naming_an_offered_tool_is_a_call_streamed_or_not(step: int) -> None:
    for text in (FENCED, "\n" + FENCED.replace("```json", "```") + "\n"):
        content, calls = HermesParser(["get_weather"]).parse(text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert streamed(HermesParser(["get_weather"]), text, step)[1] == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert HermesParser(["get_time"]).parse(FENCED) == (FENCED, [])  # not an offered tool: text
    llama = '```json\n{"name": "get_weather", "parameters": {"city": "Lima"}}\n```'
    assert [c.name for c in Llama3JsonParser(["get_weather"]).parse(llama)[1]] == ["get_weather"]
    assert Llama3JsonParser(["get_time"]).parse(llama) == (llama, [])


def test_code_in_a_fence_streams_as_text_without_waiting_for_the_end() -> None:
    parser = HermesParser(["get_weather"])
    assert parser.feed("```py") == []  # a fence's first line decides
    events = parser.feed("thon\nprint('hi')\n")
    assert "".join(e.content for e in events) == "```python\nprint('hi')\n"
    assert "".join(e.content for e in Llama3JsonParser(["get_weather"]).feed("```\nls -la\n")) == "```\nls -la\n"


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
