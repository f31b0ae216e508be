"""The Llama 3 JSON tool-call parser: the whole output as calls joined by "; ", after an optional <|python_tag|>."""

from __future__ import annotations

import json

from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser
from tool_streams import streamed


def test_llama3_json_calls() -> None:
    parser = Llama3JsonParser()
    content, calls = parser.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                                  '{"name": "get_weather", "parameters": {"city": "Quito"}}')
    assert content is None and [json.loads(c.arguments)["city"] for c in calls] == ["Lima", "Quito"]
    assert parser.parse("The weather is {unknown}") == ("The weather is {unknown}", [])
    assert streamed(Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Lima"}}', 4)[1] == {
        0: {"name": "get_weather", "arguments": '{"city": "Lima"}'}}


def test_a_call_is_held_until_the_end_and_text_streams_at_once() -> None:
    parser = Llama3JsonParser()
    assert parser.feed("<|python") == []  # may be the tag: held
    assert parser.feed('_tag|>{"name": "f", "arguments": {"x": 1}}') == []  # a call: held whole
    assert [(e.index, e.name, e.arguments) for e in parser.finish() if e.call_id is not None] == [(0, "f", None)]
    text = Llama3JsonParser()
    assert [e.content for e in text.feed("Hello")] == ["Hello"]
    assert [e.content for e in text.feed(" there")] == [" there"]
    assert text.finish() == []


def test_a_call_broken_after_the_first_object_is_text() -> None:
    out = '{"name": "f", "parameters": {}}; {"name": 3}'
    assert Llama3JsonParser().parse(out) == (out, [])
    assert Llama3JsonParser().parse('{"name": "f", "parameters": [1]}') == ('{"name": "f", "parameters": [1]}', [])


def test_grammar_joins_several_calls_with_semicolons_and_names_parameters() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    several, one = Llama3JsonParser().grammar(tools, True), Llama3JsonParser().grammar(tools, False)
    assert several.startswith('start: call ("; " call)*\ncall: %json ') and one.startswith("start: call\ncall: %json ")
    assert '"parameters"' in one and '"arguments"' not in one
