"""The Hermes tool-call parser (Qwen2.5): tagged calls among text, bare and fenced calls to offered tools, whole and
streamed in pieces."""

from __future__ import annotations

import json

import pytest

from lmkernel.serve.tool_parsers.hermes import HermesParser
from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser
from tool_streams import streamed

TWO_CALLS = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "opts": {"units": "C"}}}\n'
             '</tool_call>\n<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>')

FENCED = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


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


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_hermes_bare_object_naming_an_offered_tool_is_a_call(step: int) -> None:
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert HermesParser(["get_weather"]).parse(bare)[1][0].name == "get_weather"
    assert HermesParser(["get_time"]).parse(bare) == (bare, [])  # not an offered tool: text
    assert streamed(HermesParser(["get_weather"]), bare, step)[1] == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert streamed(HermesParser(["get_weather"]), "{braces} in text", step) == ("{braces} in text", {})


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
