"""The shape of the package, as shared/DESIGN.md draws it: imports only go down its order, and one chat
completion runs through one short chain of files, each with one job."""

from __future__ import annotations

import ast
import json
import sys
import threading
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmkernel"

# DESIGN.md's order, bottom up: a module imports only from tiers below its own (or its own package).
TIERS = [
    {"errors"},
    {"config"},
    {"registry", "loader", "layers", "memory"},
    {"models", "pull"},
    {"loading"},
    {"engine", "compress", "train"},
    {"eval"},
    {"serve", "apps"},
    {"cluster"},
    {"bench"},
    {"cli"},
]
ENTRY_POINTS = {"train/__main__.py"}  # `python -m lmkernel.train` (torchrun's form) is `lmk train`: it calls the CLI


def _tier(package: str) -> int:
    return next(i for i, names in enumerate(TIERS) if package in names)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        found.update(n.split(".")[1] for n in names if n.startswith("lmkernel."))
    return found


def test_no_module_imports_one_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() in ENTRY_POINTS or rel == Path("__init__.py"):
            continue
        own = rel.parts[0].removesuffix(".py")
        for target in _imports(path) - {own}:
            if _tier(target) >= _tier(own):
                upward.append(f"{rel} imports lmkernel.{target}")
    assert not upward, upward


def _private_names() -> set[str]:
    """Underscore names lmkernel's classes define (methods, and attributes set on self)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("_"):
                        names.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) \
                            and isinstance(item.value, ast.Name) and item.value.id == "self":
                        names.add(item.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reads_another_objects_underscore_fields():
    """An object's underscore fields and methods are its own: only `self` (or `cls`) reaches them, and no module
    imports another's underscore names. (Third-party privates, such as torch's `_int_mm`, are not lmkernel's.)"""
    private = _private_names()
    reaching = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                reaching.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmkernel"):
                reaching.extend(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {a.name}" for a in node.names
                                if a.name.startswith("_"))
    assert not reaching, reaching


# The files a chat completion's request passes through, from the route to the logits and back (15: the KV cache
# manager keeps a block table per KV group over the block pool's free list, the output processor turns the
# engine core's tokens into text and ends, and the attention backend lays out how decodes read the cache, each
# its own file); and the ones beside that path that each do one job for every request (the ASGI guard, keys,
# logs, metrics, the JSON schemas, tool-call parsing) or are the model's building blocks.
CHAT_PATH = {
    "serve/routes/chat.py", "serve/checks.py", "serve/generation.py", "engine/async_engine.py",
    "engine/llm_engine.py", "engine/output_processor.py", "engine/request.py", "engine/scheduler.py",
    "memory/kv_manager.py", "memory/block_pool.py", "engine/model_runner.py", "engine/attention_backends.py",
    "models/llama.py", "engine/sampling.py", "loader/tokenizer.py",
}
BESIDE = {"serve/app.py", "serve/auth.py", "serve/logs.py", "serve/metrics.py", "serve/protocol.py", "serve/tools.py"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def traced(smollm):
    """The lmkernel files of the second of two chat completions, and of a streamed chat with a required tool
    call (the first runs imports and first compiles), and every call between two of them: (caller, callee)."""
    from fastapi.testclient import TestClient

    from lmkernel.config import EngineConfig
    from lmkernel.engine.async_engine import AsyncEngine
    from lmkernel.serve.app import ServerConfig, build_app

    app = build_app(ServerConfig(model_name="m", tool_call_parser="llama3_json"),
                    AsyncEngine.build(smollm, EngineConfig(kv_cache_memory="16MiB")), None)
    root = f"{PACKAGE}/"
    recording: dict[str, set] = {}
    current: list[str] = []

    def profile(frame, event, _arg):  # noqa: ANN001 - sys.setprofile's signature
        if current and event == "call" and frame.f_code.co_filename.startswith(root):
            callee = frame.f_code.co_filename[len(root):]
            recording[current[0]].add(callee)
            caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
            if caller.startswith(root) and caller[len(root):] != callee:
                recording["calls"].add((caller[len(root):], callee))

    chat = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
    tools = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 32,
             "tools": TOOLS, "tool_choice": "required", "stream": True}
    recording.update(chat=set(), tools=set(), calls=set())
    sys.setprofile(profile)
    threading.setprofile(profile)  # the app's and the engine's threads start after this
    try:
        with TestClient(app) as client:
            for body, name in ((chat, "chat"), (tools, "tools")):
                assert client.post("/v1/chat/completions", json=body).status_code == 200  # warm
                current.append(name)
                reply = client.post("/v1/chat/completions", json=body)
                current.clear()
                assert reply.status_code == 200
                recording[name + " reply"] = reply.text
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return recording


def test_a_chat_completion_runs_through_fifteen_files(traced):
    assert json.loads(traced["chat reply"])["choices"][0]["message"]["content"]
    path = {f for f in traced["chat"] if not f.startswith("layers/")} - BESIDE
    assert path == CHAT_PATH and len(path) <= 15, sorted(path ^ CHAT_PATH)


def test_a_streamed_chat_with_tools_adds_only_the_tool_and_grammar_files(traced):
    events = [json.loads(line[6:]) for line in traced["tools reply"].splitlines()
              if line.startswith("data: {")]
    text = "".join(ch["delta"].get("content") or "" for e in events for ch in e["choices"])
    assert "".join(text.split()).startswith('{"name":"get_weather"')  # the grammar forces a call (135M params: it
    # then spins whitespace the JSON grammar allows until max_tokens, so no whole call is parsed)
    extra = {f for f in traced["tools"] if not f.startswith("layers/")} - BESIDE - CHAT_PATH
    assert extra <= {"engine/structured.py", "serve/tool_parsers/__init__.py", "serve/tool_parsers/llama3.py"}, extra


def test_no_call_in_a_traced_request_goes_to_a_module_above_its_caller(traced):
    def tier(path: str) -> int:
        return _tier(path.split("/")[0].removesuffix(".py"))

    assert ("serve/routes/chat.py", "serve/checks.py") in traced["calls"]
    assert ("engine/model_runner.py", "engine/attention_backends.py") in traced["calls"]
    upward = sorted(f"{a} -> {b}" for a, b in traced["calls"] if tier(b) > tier(a))
    assert not upward, upward
