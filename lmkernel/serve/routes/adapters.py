"""LoRA adapters loaded and unloaded while serving, under vLLM's names: POST /v1/load_lora_adapter and
POST /v1/unload_lora_adapter (only with --allow-runtime-lora, which needs API keys, and only from the
directories given with --lora-modules-dir)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.errors import AdapterError
from lmkernel.serve.checks import Service, service
from lmkernel.serve.protocol import APIError, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from lmkernel.serve.responses import LoraAdapterStatus, documented

router = APIRouter()


def _engine(svc: Service, request: Request) -> AsyncEngine:
    svc.authenticate(request)
    if not svc.config.allow_runtime_lora or svc.engine is None:
        raise APIError(404, "loading LoRA adapters at run time is off; start lmk serve with --allow-runtime-lora",
                       code="not_enabled")
    return svc.engine


def allowed_adapter_path(path: str, roots: Sequence[str]) -> str:
    """`path` with its symlinks resolved, if it and every file under it lie inside one of `roots`; else a 403
    that says nothing of what lies outside (not even whether it exists)."""
    def inside(p: Path) -> bool:
        return any(p == r or r in p.parents for r in resolved_roots)

    resolved_roots = [Path(r).resolve() for r in roots]
    try:
        target = Path(path).expanduser()
        target = target.resolve() if target.is_absolute() or not resolved_roots else (resolved_roots[0] / target).resolve()
        outside = not inside(target)
        if not outside and target.is_dir():
            outside = any(not inside(entry.resolve()) for entry in target.rglob("*"))
    except (ValueError, OSError, RuntimeError):  # a NUL byte, a lone surrogate, a symlink loop
        raise APIError(400, "lora_path is not a usable file system path", "lora_path") from None
    if outside:
        raise APIError(403, f"lora_path {path!r} is outside the directories adapters may be loaded from "
                       "(--lora-modules-dir), or links out of them", "lora_path", code="forbidden_path")
    return str(target)


@router.post("/v1/load_lora_adapter", **documented(LoadLoraAdapterRequest, LoraAdapterStatus))
async def load_lora_adapter(request: Request) -> dict[str, Any]:
    svc = service(request)
    engine = _engine(svc, request)
    body = await svc.parse(request, LoadLoraAdapterRequest)
    name = body.lora_name
    if not name or ":" in name or name != name.strip():
        raise APIError(400, f"lora_name {name!r}: expected a non-empty name without ':' or surrounding spaces", "lora_name")
    if name in engine.lora_names:
        raise APIError(400, f"an adapter named '{name}' is already loaded; unload it first", "lora_name")
    path = allowed_adapter_path(body.lora_path, svc.config.lora_modules_dirs)
    try:
        dropped = await engine.load_adapter(name, path)
    except AdapterError as exc:
        raise APIError(400, str(exc), None if "adapter slots" in str(exc) else "lora_path") from None
    return {"lora_name": name, "status": "loaded", "model": f"{svc.config.model_name}:{name}", "unloaded": dropped}


@router.post("/v1/unload_lora_adapter", **documented(UnloadLoraAdapterRequest, LoraAdapterStatus))
async def unload_lora_adapter(request: Request) -> dict[str, Any]:
    svc = service(request)
    engine = _engine(svc, request)
    body = await svc.parse(request, UnloadLoraAdapterRequest)
    if body.lora_name not in engine.lora_names:
        raise APIError(404, f"LoRA adapter '{body.lora_name}' is not loaded", "lora_name")
    await engine.unload_adapter(body.lora_name)
    return {"lora_name": body.lora_name, "status": "unloaded"}
