"""A chat request's tools: checked, rendered by the model's own template, forced by a grammar when the
request requires a call, and parsed out of the output by the model family's parser (`tool_parsers/`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lmkernel.serve.protocol import APIError, ChatMessage
from lmkernel.serve.tool_parsers import PARSERS, make_parser, parser_for_template

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ToolPlan:
    """What a request with tools gets: the tools its template renders, how calls are chosen, the
    parser of the output, and the grammar that forces a call ("required" or a named function)."""

    tools: list[dict[str, Any]]
    choice: str  # "none", "auto", "required", or the name of the function to call
    parser: str
    grammar: str | None

    @property
    def parses(self) -> bool:
        return self.choice != "none"


def _check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise APIError(400, f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}', where)
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON schema (an object)", f"{where}.function.parameters")
        checked.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    names = [t["function"]["name"] for t in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"tools name the function '{dup}' twice", "tools")
    return checked


def _choice(tool_choice: str | dict[str, Any] | None, names: list[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or a named function; got '{tool_choice}'",
                           "tool_choice")
        return tool_choice
    name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must be {"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names '{name}', which is not among the tools ({', '.join(names)})", "tool_choice")
    return name


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, template: str | None,
               parser: str | None, parallel: bool | None = None) -> ToolPlan | None:
    """The request's tool plan, or None without tools; a 400 naming the field for anything not servable.
    `parallel` False (OpenAI's `parallel_tool_calls`): a forced call is exactly one."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice asks for a call, but the request has no tools", "tool_choice")
        return None
    checked = _check_tools(tools)
    names = [t["function"]["name"] for t in checked]
    choice = _choice(tool_choice, names)
    name = parser or parser_for_template(template)
    if name is None:
        raise APIError(400, "this model's chat template does not render tools, so it cannot be offered any; serve a "
                       f"model whose template does, or start lmk serve with --tool-call-parser ({', '.join(PARSERS)})",
                       "tools")
    grammar = None
    if choice not in ("none", "auto"):
        forced = checked if choice == "required" else [t for t in checked if t["function"]["name"] == choice]
        grammar = make_parser(name).grammar(forced, several=choice == "required" and parallel is not False)
    return ToolPlan(checked, choice, name, grammar)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates read it: text content, an assistant's calls with their arguments
    as objects (templates write them with `tojson`), a tool result with the id of its call."""
    out = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}].tool_calls: only assistant messages carry tool calls", f"messages[{i}].tool_calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages[{i}].tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"{where} must have function.name and function.arguments", where)
                args = fn.get("arguments", "{}")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    raise APIError(400, f"{where}.function.arguments is not valid JSON", f"{where}.function.arguments") from None
                calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
            message["tool_calls"] = calls
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    return out
