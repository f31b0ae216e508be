"""Llama 3.1/3.2 JSON tool calls: the whole output is {"name": ..., "parameters": {...}} (several joined by
"; "), optionally after <|python_tag|>; any other output is text. The same object in a fenced block is a call
when it names an offered tool."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmkernel.serve.tool_parsers import StreamEvent, ToolCall, ToolParser, call_schema, may_be_whole_call, unfenced

TAG = "<|python_tag|>"


def _calls(text: str) -> list[ToolCall] | None:
    body = text.strip().removeprefix(TAG).strip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        args = obj.get("parameters", obj.get("arguments", {})) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            return None
        calls.append(ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)))
        while pos < len(body) and body[pos] in " \n;":
            pos += 1
    return calls or None


class Llama3JsonParser(ToolParser):
    def __init__(self, names: Sequence[str] = ()) -> None:
        super().__init__(names)
        self._buf, self._holding = "", None

    def grammar(self, tools: Sequence[Mapping[str, Any]], several: bool) -> str:
        schema = json.dumps(call_schema(tools, "parameters"))
        more = ' ("; " call)*' if several else ""
        return f"start: call{more}\ncall: %json {schema}\n"

    def feed(self, delta: str) -> list[StreamEvent]:
        """Text streams as it comes unless the output opens like a call; a call is sent whole at the end."""
        self._buf += delta
        if self._holding is None:
            head = self._buf.lstrip()
            if not head or (len(head) < len(TAG) and TAG.startswith(head)):
                return []
            self._holding = True if head.startswith(TAG) else may_be_whole_call(head)
            if self._holding is None:
                return []
        if self._holding:
            return []
        out, self._buf = self._buf, ""
        return [StreamEvent(content=out)] if out else []

    def finish(self) -> list[StreamEvent]:
        text, self._buf = self._buf, ""
        calls = _calls(text) if self._holding else None
        body = unfenced(text)
        if not calls and self._holding and body != text:  # fenced: a call only to an offered tool
            calls = _calls(body)
            calls = calls if calls and all(c.name in self.names for c in calls) else None
        if not calls:
            return [StreamEvent(content=text)] if text else []
        return [e for call in calls for e in self._call_events(call)]
