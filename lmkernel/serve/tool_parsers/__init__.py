"""Tool calls in a model's output: one parser per model family, chosen from the model's chat template.

A parser turns generated text into the text outside the calls and the calls themselves (OpenAI's
`message.tool_calls`), follows a stream of text deltas (`stream()`), and writes the grammar that forces
a call in its family's format when a request says `tool_choice: "required"` or names a function.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PARSERS = ("hermes", "llama3_json")


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


def make_parser(name: str, tools: Sequence[Mapping[str, Any]] = ()) -> Any:
    """A new parser (they hold a stream's state) by its `--tool-call-parser` name, for the offered `tools`."""
    from lmkernel.serve.tool_parsers.hermes import HermesParser
    from lmkernel.serve.tool_parsers.llama3 import Llama3JsonParser

    if name == "hermes":
        return HermesParser([t["function"]["name"] for t in tools])
    return Llama3JsonParser()


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's tool format needs; None when the template renders no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"  # Qwen2.5, Hermes, and their derivatives
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None
