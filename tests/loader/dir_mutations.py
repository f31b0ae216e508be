"""Seeded mutations of a model or adapter directory for fuzzing: one value of a JSON file (config.json,
adapter_config.json, tokenizer_config.json) changed to another type or an edge value, or removed; or one entry
of a safetensors header (a tensor's dtype, shape or data offsets) changed; or bytes of a file scrambled."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

_VALUES: list[Any] = [0, -1, 1, 2**31, 2**63, 0.5, -0.0, float("nan"), "x", "", None, True, [], {}, [1, 2], "../../etc"]


def _paths(value: Any, at: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (keys and list indices)."""
    out = [at] if at else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            out += _paths(v, (*at, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if delete and isinstance(doc, dict):
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


def _mutate_json(path: Path, rng: random.Random) -> str:
    doc = json.loads(path.read_text())
    where = rng.choice(_paths(doc) or [()])
    if not where:
        path.write_text(json.dumps(rng.choice(_VALUES)))
        return f"{path.name}: replaced whole"
    value, delete = rng.choice(_VALUES), rng.random() < 0.15
    _set(doc, where, value, delete)
    path.write_text(json.dumps(doc))
    return f"{path.name}: {'/'.join(map(str, where))} {'removed' if delete else f'-> {value!r}'}"


def _mutate_safetensors(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    field = rng.choice(["dtype", "shape", "data_offsets", "data_offsets"])
    old = header[name][field]
    if field == "dtype":
        new: Any = rng.choice(["F16", "BF16", "I64", "U8", "F64", "XX", 7])
    elif field == "shape":
        new = rng.choice([[], [0], [old[0] * 2] + old[1:], old[::-1], [1 << 40] + old[1:], [-1] + old[1:], "3"])
    else:
        new = rng.choice([[0, old[1] - old[0]], [old[0], old[1] + 4], [old[1], old[0]], [0, 1 << 50], [old[0] + 1, old[1] + 1]])
    header[name][field] = new
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + n :]))
    return f"{path.name}: {name}.{field} {old} -> {new}"


def mutate_dir(source: Path, target: Path, seed: int) -> str:
    """Copy `source` to `target` and change one thing in it; returns what changed."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    rng = random.Random(seed)
    files = sorted(p for p in target.iterdir() if p.suffix in (".json", ".safetensors") and p.name != "tokenizer.json")
    path = rng.choice(files)
    if rng.random() < 0.1:
        data = bytearray(path.read_bytes())
        at = rng.randrange(len(data))
        data[at : at + 8] = bytes(rng.randrange(256) for _ in range(8))
        path.write_bytes(bytes(data))
        return f"{path.name}: bytes at {at} scrambled"
    return _mutate_json(path, rng) if path.suffix == ".json" else _mutate_safetensors(path, rng)
