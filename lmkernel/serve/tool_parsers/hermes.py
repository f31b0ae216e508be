"""Hermes-style tool calls (Qwen2.5 and its derivatives): each call is a JSON object
{"name": ..., "arguments": {...}} between <tool_call> and </tool_call>, text may surround the calls.

Small Qwen2.5 models often answer with the bare object and no tags; an output that is exactly such an
object, naming one of the offered tools, is read as that call (anything else stays text)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lmkernel.serve.tool_parsers import StreamEvent, ToolCall, call_schema, parsed_object

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALLS = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
# The opening of a call up to its arguments, when the model writes the name first (as the template does).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _call(body: str) -> ToolCall | None:
    obj = parsed_object(body.strip())
    if obj is None or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments", {}), dict):
        return None
    return ToolCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


class HermesParser:
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls or None, the calls); a call that does not parse leaves all as text."""
        if OPEN not in text:
            bare = self._bare(text)
            return (None, [bare]) if bare is not None else (text, [])
        calls, parts, pos = [], [], 0
        for m in _CALLS.finditer(text):
            call = _call(m.group(1))
            if call is None:
                return text, []
            calls.append(call)
            parts.append(text[pos : m.start()])
            pos = m.end()
        if not calls:
            return text, []
        content = ("".join(parts) + text[pos:]).strip()
        return content or None, calls

    def grammar(self, tools: Sequence[Mapping[str, Any]], several: bool) -> str:
        """Lark: calls to `tools` in the template's format, one or more (`several`) or exactly one."""
        schema = json.dumps(call_schema(tools, "arguments"))
        return f'start: call{"+" if several else ""}\ncall: <tool_call> "\\n" %json {schema} "\\n" </tool_call> "\\n"?\n'

    def _bare(self, text: str) -> ToolCall | None:
        call = _call(text)
        return call if call is not None and call.name in self.names else None

    # -- streaming --------------------------------------------------------------------------------

    def __init__(self, names: Collection[str] = ()) -> None:
        self.names = set(names)  # the offered tools: a bare object naming one of them is a call
        self._buf, self._in_call, self._index = "", False, -1
        self._bare_held: bool | None = None  # the output opens with "{": held whole until it ends
        self._opened: ToolCall | None = None
        self._args_at = self._emitted = 0
        self.calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        """Events for the text so far; a possible tag at the end is held until the next delta decides it."""
        self._buf += delta
        events: list[StreamEvent] = []
        if self._bare_held is None:
            if not self._buf.strip():
                return events
            self._bare_held = self._buf.lstrip().startswith("{")
        if self._bare_held:
            if OPEN not in self._buf:
                return events
            self._bare_held = False
        while True:
            if not self._in_call:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                                 if OPEN.startswith(self._buf[-k:])), 0)
                    cut = len(self._buf) - keep
                    if cut:
                        events.append(StreamEvent(content=self._buf[:cut]))
                    self._buf = self._buf[cut:]
                    return events
                if at:
                    events.append(StreamEvent(content=self._buf[:at]))
                self._buf, self._in_call, self._opened = self._buf[at + len(OPEN) :], True, None
                continue
            end = self._buf.find(CLOSE)
            body = self._buf if end < 0 else self._buf[:end]
            events += self._call_events(body, closed=end >= 0)
            if end < 0:
                return events
            self._buf, self._in_call = self._buf[end + len(CLOSE) :], False

    def finish(self) -> list[StreamEvent]:
        """At the end of the output: what is held back, and a call the model left unclosed."""
        if not self._in_call:
            rest, self._buf = self._buf, ""
            bare = self._bare(rest) if self._bare_held else None
            if bare is not None:
                self.calls = 1
                return [StreamEvent(index=0, call_id=bare.id, name=bare.name), StreamEvent(index=0, arguments=bare.arguments)]
            return [StreamEvent(content=rest)] if rest else []
        events = self._call_events(self._buf, closed=True)
        self._buf, self._in_call = "", False
        return events

    def _call_events(self, body: str, closed: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._opened is None:
            head = _HEAD.match(body)
            if head is None and not closed:
                return events
            if head is None:  # not in the usual order: the whole call at once, or text when it does not parse
                call = _call(body)
                if call is None:
                    return [StreamEvent(content=OPEN + body + CLOSE)]
                self._index += 1
                self.calls += 1
                return [StreamEvent(index=self._index, call_id=call.id, name=call.name),
                        StreamEvent(index=self._index, arguments=call.arguments)]
            self._index += 1
            self.calls += 1
            self._opened = ToolCall(json.loads(f'"{head.group(1)}"'), "")
            self._args_at, self._emitted = head.end(), 0
            events.append(StreamEvent(index=self._index, call_id=self._opened.id, name=self._opened.name))
        args = body[self._args_at :]
        last = args.rfind("}")  # it may close the call's object, not the arguments: held until known
        visible = args[:last] if last >= 0 else ""
        if closed:
            visible = args[:last] if last >= 0 else args
        if len(visible) > self._emitted:
            events.append(StreamEvent(index=self._index, arguments=visible[self._emitted :]))
            self._emitted = len(visible)
        return events
