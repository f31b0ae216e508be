"""The shape of the package, as shared/DESIGN.md draws it: imports only go down its order, and one chat
completion runs through one short chain of files, each with one job."""

from __future__ import annotations

import ast
import sys
import threading
from pathlib import Path

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


# The files a chat completion's request passes through, from the route to the logits and back (14: the KV cache
# manager keeps a block table per KV group over the block pool's free list, and the output processor turns the
# engine core's tokens into text and ends, each its own file); and the
# ones beside that path that each do one job for every request (the ASGI guard, keys, logs, metrics, the
# JSON schemas, tool-call parsing) or are the model's building blocks.
CHAT_PATH = {
    "serve/routes/chat.py", "serve/checks.py", "serve/generation.py", "engine/async_engine.py",
    "engine/llm_engine.py", "engine/output_processor.py", "engine/request.py", "engine/scheduler.py",
    "memory/kv_manager.py", "memory/block_pool.py", "engine/model_runner.py", "models/llama.py", "engine/sampling.py",
    "loader/tokenizer.py",
}
BESIDE = {"serve/app.py", "serve/auth.py", "serve/logs.py", "serve/metrics.py", "serve/protocol.py", "serve/tools.py"}


def test_a_chat_completion_runs_through_fourteen_files(smollm):
    from fastapi.testclient import TestClient

    from lmkernel.config import EngineConfig
    from lmkernel.engine.async_engine import AsyncEngine
    from lmkernel.serve.app import ServerConfig, build_app

    app = build_app(ServerConfig(model_name="m"), AsyncEngine.build(smollm, EngineConfig(kv_cache_memory="16MiB")), None)
    seen: set[str] = set()
    recording = False
    root = f"{PACKAGE}/"

    def profile(frame, event, _arg):  # noqa: ANN001 - sys.setprofile's signature
        if recording and event == "call" and frame.f_code.co_filename.startswith(root):
            seen.add(frame.f_code.co_filename[len(root):])

    body = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
    sys.setprofile(profile)
    threading.setprofile(profile)  # the app's and the engine's threads start after this
    try:
        with TestClient(app) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200  # warm: imports, first compile
            recording = True
            reply = client.post("/v1/chat/completions", json=body)
            recording = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    path = {f for f in seen if not f.startswith("layers/")} - BESIDE
    assert path == CHAT_PATH and len(path) <= 14, sorted(path ^ CHAT_PATH)
