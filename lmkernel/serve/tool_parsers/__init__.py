"""Tool calls in a model's output: one parser per model family, chosen from the model's chat template.

A parser follows the output as text deltas (`feed`, then `finish`) and says what each adds: text outside
the calls, or a call (OpenAI's `message.tool_calls`). A whole output is read by the same steps (`parse`), so a
request gets the same decision streamed or not. Each call is decided when it ends: one that parses is a
call, one that does not stays text. Parsers also write the grammar that forces a call in their family's
format when a request says `tool_choice: "required"` or names a function.

Small models often answer a request with tools by the bare JSON object of a call, or that object in a
fenced block (```` ```json ````): an output that is exactly such an object, naming one of the offered
tools, is read as that call (anything else stays text).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmkernel.config import TOOL_CALL_PARSERS

PARSERS = TOOL_CALL_PARSERS


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass
class StreamEvent:
    """What a stream of text deltas adds: visible text, or a piece of the call at `index` (its id and
    name when it opens, then fragments of its arguments)."""

    content: str = ""
    index: int | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def tool_delta(self) -> dict[str, Any]:
        delta: dict[str, Any] = {"index": self.index}
        if self.call_id is not None:
            delta.update(id=self.call_id, type="function", function={"name": self.name, "arguments": ""})
        else:
            delta["function"] = {"arguments": self.arguments}
        return delta


def function_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of a function's arguments (an empty object when it declares none)."""
    params = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    return dict(params)


def call_schema(tools: Sequence[Mapping[str, Any]], arguments_key: str) -> dict[str, Any]:
    """One call to any of `tools`: {"name": <one of them>, <arguments_key>: <its arguments>}."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, arguments_key: function_schema(t)},
                "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parsed_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# A fenced block of JSON: ``` or ```json on its own line, the body, ``` closing it.
_FENCED = re.compile(r"\s*```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\s*", re.S | re.I)
_FENCE_OPEN = re.compile(r"```[ \t]*(?:json)?[ \t]*\n\s*", re.I)
_FENCE_HEAD = re.compile(r"`{0,3}|```[ \t]*[A-Za-z]*[ \t]*", re.I)  # a fence's first line, still coming


def unfenced(text: str) -> str:
    """The body of an output that is one fenced block, else the text itself."""
    m = _FENCED.fullmatch(text)
    return m.group(1) if m else text


def may_be_whole_call(head: str) -> bool | None:
    """Whether an output opening with `head` (leading space removed) may be a whole-output call, a bare or
    fenced JSON object: True (hold it to the end), False (it is text), None (not known yet)."""
    if head.startswith("{"):
        return True
    if not head.startswith("```"):
        return None if "```".startswith(head) else False
    m = _FENCE_OPEN.match(head)
    if m is None:
        return None if _FENCE_HEAD.fullmatch(head) else False
    rest = head[m.end():]
    return None if not rest else rest.startswith("{")


def assemble(events: Sequence[StreamEvent]) -> tuple[str | None, list[ToolCall]]:
    """A stream's events as a whole message: (the text, None when calls leave only space; the calls)."""
    content, calls = "", {}
    for e in events:
        if e.index is None:
            content += e.content
        elif e.call_id is not None:
            calls[e.index] = ToolCall(e.name or "", "", e.call_id)
        else:
            calls[e.index].arguments += e.arguments or ""
    if not calls:
        return content, []
    return content.strip() or None, [calls[i] for i in sorted(calls)]


class ToolParser:
    """Base of the family parsers: `feed` and `finish` give a stream's events, `parse` a whole output's (by
    the same steps). `calls` counts the calls found so far; `names` are the offered tools."""

    def __init__(self, names: Collection[str] = ()) -> None:
        self.names = set(names)
        self.calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        raise NotImplementedError

    def finish(self) -> list[StreamEvent]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls, or None; the calls) of a whole output: what streaming it gives."""
        return assemble(self.feed(text) + self.finish())

    def _call_events(self, call: ToolCall) -> list[StreamEvent]:
        index = self.calls
        self.calls += 1
        return [StreamEvent(index=index, call_id=call.id, name=call.name), StreamEvent(index=index, arguments=call.arguments)]


def make_parser(name: str, tools: Sequence[Mapping[str, Any]] = ()) -> Any:
    """A new parser (they hold a stream's state) by its `--tool-call-parser` name, for the offered `tools`."""
    from lmkernel.serve.tool_parsers.hermes import HermesParser
    from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser

    names = [t["function"]["name"] for t in tools]
    return HermesParser(names) if name == "hermes" else Llama3JsonParser(names)


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's tool format needs; None when the template renders no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"  # Qwen2.5, Hermes, and their derivatives
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None
