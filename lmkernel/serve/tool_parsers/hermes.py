"""Hermes-style tool calls (Qwen2.5 and its derivatives): each call is a JSON object
{"name": ..., "arguments": {...}} between <tool_call> and </tool_call>, text may surround the calls.

Small Qwen2.5 models often answer with the bare object and no tags, or with it in a fenced block; an output
that is exactly such an object, naming one of the offered tools, is read as that call (anything else stays
text). A tagged call is sent when its closing tag arrives (or the output ends), once it parses."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmkernel.serve.tool_parsers import StreamEvent, ToolCall, ToolParser, call_schema, may_be_whole_call, parsed_object, unfenced

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _call(body: str) -> ToolCall | None:
    obj = parsed_object(body.strip())
    if obj is None or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments", {}), dict):
        return None
    return ToolCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


def _held_tag(text: str) -> int:
    """How many characters at the end of `text` may be the start of an opening tag."""
    return next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])), 0)


class HermesParser(ToolParser):
    def grammar(self, tools: Sequence[Mapping[str, Any]], several: bool) -> str:
        """Lark: calls to `tools` in the template's format, one or more (`several`) or exactly one."""
        schema = json.dumps(call_schema(tools, "arguments"))
        return f'start: call{"+" if several else ""}\ncall: <tool_call> "\\n" %json {schema} "\\n" </tool_call> "\\n"?\n'

    def __init__(self, names: Sequence[str] = ()) -> None:
        super().__init__(names)
        self._buf, self._in_call = "", False
        self._whole: bool | None = None  # the output may be one bare or fenced call: held whole until it ends

    def feed(self, delta: str) -> list[StreamEvent]:
        """Events for the text so far; a possible tag at the end is held until the next delta decides it."""
        self._buf += delta
        if self._whole is None:
            self._whole = may_be_whole_call(self._buf.lstrip()) if self._buf.strip() else None
            if self._whole is None:
                return []
        if self._whole:
            if OPEN not in self._buf:
                return []
            self._whole = False
        events: list[StreamEvent] = []
        while True:
            if not self._in_call:
                at = self._buf.find(OPEN)
                cut = len(self._buf) - _held_tag(self._buf) if at < 0 else at
                if cut:
                    events.append(StreamEvent(content=self._buf[:cut]))
                if at < 0:
                    self._buf = self._buf[cut:]
                    return events
                self._buf, self._in_call = self._buf[at + len(OPEN) :], True
                continue
            end = self._buf.find(CLOSE)
            if end < 0:
                return events
            events += self._closed(self._buf[:end])
            self._buf, self._in_call = self._buf[end + len(CLOSE) :], False

    def finish(self) -> list[StreamEvent]:
        """At the end of the output: what is held back, and a call the model left unclosed."""
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = _call(rest)
            return self._call_events(call) if call is not None else [StreamEvent(content=OPEN + rest)]
        if self._whole:
            call = _call(unfenced(rest))
            if call is not None and call.name in self.names:
                return self._call_events(call)
        return [StreamEvent(content=rest)] if rest else []

    def _closed(self, body: str) -> list[StreamEvent]:
        call = _call(body)
        return self._call_events(call) if call is not None else [StreamEvent(content=OPEN + body + CLOSE)]
