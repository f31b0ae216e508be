"""Feeding a tool parser an output in pieces and gathering what it streams (the serve tool-parser tests share it)."""

from __future__ import annotations


def streamed(parser, text: str, step: int) -> tuple[str, dict[int, dict]]:
    """The text content and, by index, each call's name and concatenated arguments, from feeding `text` `step` characters at a time."""
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
