"""Hugging Face model directories' safetensors (single or sharded, and sentence-transformers Dense modules) into
tensors, each file's header checked first; their config.json is hf_config's."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmkernel.errors import LmkError, WeightsError

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_json(path: Path, error: type[LmkError] = WeightsError) -> dict[str, Any]:
    """Parse a JSON object from `path`, or raise `error` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_sentence_dense(directory: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The sentence-transformers Dense modules' weights, named `sentence_dense.{i}.weight` / `.bias` in order."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return {}
    folders = [directory / str(m.get("path", "")) for m in json.loads(modules_file.read_text())
               if str(m.get("type", "")).endswith("models.Dense")]
    out = {}
    for i, folder in enumerate(folders):
        for name, t in load_tensors_of(folder / "model.safetensors", dtype, device).items():
            out[f"sentence_dense.{i}.{name.removeprefix('linear.')}"] = t
    return out


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: those listed in an index, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: expected a non-empty 'weight_map' of tensor name to shard file")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index}: lists shard '{f.name}', which is not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors weights found")
    return files


def check_safetensors(path: Path) -> dict[str, Any]:
    """Validate a safetensors file's header against its size; returns the header.

    A truncated download otherwise fails deep inside the reader, or later with garbage weights.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes; expected an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise WeightsError(
                f"{path}: truncated safetensors file: header needs {8 + header_len} bytes, file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (the header is not a JSON object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"]) \
            and info["data_offsets"][0] <= info["data_offsets"][1]
        if not ok:
            raise WeightsError(f"{path}: tensor '{name}' has a malformed header entry (expected dtype, a shape of "
                               f"sizes and two increasing data offsets): {str(info)[:200]}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise WeightsError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + end} bytes, file has {size}"
        )
    return header


def _float_tensor_headers(directory: Path) -> list[dict[str, Any]]:
    """Header entries (dtype, shape) of every floating-point tensor in the directory's weight files."""
    return [
        info
        for path in weight_files(directory)
        for name, info in check_safetensors(path).items()
        if name != "__metadata__" and info["dtype"] in _SAFETENSORS_DTYPES
    ]


def stored_dtype(directory: Path) -> str:
    """The floating dtype most of the weights are stored in."""
    counts: dict[str, int] = {}
    for info in _float_tensor_headers(directory):
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return _SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else "unknown"


def load_tensors(directory: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (and of its sentence-transformers Dense modules);
    floating ones cast to `dtype`."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors |= load_tensors_of(path, dtype, device)
    return tensors | load_sentence_dense(directory, dtype, device)


def load_tensors_of(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, its header checked first; floating ones cast to `dtype`."""
    check_safetensors(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                tensors[name] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    except SafetensorError as exc:
        raise WeightsError(f"{path}: cannot read safetensors file ({exc})") from None
    return tensors


def parameter_count(directory: Path) -> int:
    """Number of floating-point weights in the directory's safetensors files, read from their headers."""
    return sum(math.prod(int(d) for d in info["shape"]) for info in _float_tensor_headers(directory))
