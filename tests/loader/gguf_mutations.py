"""Seeded structural mutations of a GGUF file for fuzzing its reader and everything it feeds: the header is
walked field by field (metadata values, array counts, tensor ranks, dimensions, types, offsets), one field is
set to a value chosen to break an assumption (0, 1, off by one, doubled, another field's value, huge), or a
few bytes of the header or the block data are flipped."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class Field:
    """A number in the header: where it is, its struct format, and what it is (for reports)."""

    what: str
    pos: int
    fmt: str


def header_fields(data: bytes) -> tuple[list[Field], int]:
    """Every number in a GGUF header (version 3), and where the header ends."""
    fields: list[Field] = [Field("version", 4, "<I"), Field("tensor_count", 8, "<Q"), Field("kv_count", 16, "<Q")]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(at: int) -> tuple[str, int]:
        n = struct.unpack_from("<Q", data, at)[0]
        return data[at + 8 : at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def value(kind: int, at: int, what: str) -> int:
        if kind == 8:
            fields.append(Field(f"{what} (string length)", at, "<Q"))
            return string(at)[1]
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            fields.append(Field(f"{what} (array item type)", at, "<I"))
            fields.append(Field(f"{what} (array count)", at + 4, "<Q"))
            at += 12
            for i in range(count):
                at = value(item, at, f"{what}[{i}]") if item in (8, 9) else at + _SIZES[item]
                if item not in (8, 9) and i < 4:
                    fields.append(Field(f"{what}[{i}]", at - _SIZES[item], _FORMATS[item]))
            return at
        fields.append(Field(what, at, _FORMATS[kind]))
        return at + _SIZES[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        kind = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"{key} (value type)", pos, "<I"))
        pos = value(kind, pos + 4, key)
    for _ in range(n_tensors):
        name, pos = string(pos)
        rank = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"{name} rank", pos, "<I"))
        pos += 4
        for d in range(rank):
            fields.append(Field(f"{name} dim {d}", pos, "<Q"))
            pos += 8
        fields.append(Field(f"{name} type", pos, "<I"))
        fields.append(Field(f"{name} offset", pos + 4, "<Q"))
        pos += 12
    return fields, pos


def _new_value(rng: random.Random, old: float | int, fmt: str, others: list[float | int]) -> float | int:
    if fmt in ("<f", "<d"):
        return rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, old * 2, -old, 1e-30])
    bits = struct.calcsize(fmt) * 8
    signed = fmt[1].islower()
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    picks = [0, 1, old + 1, old - 1, old * 2, old // 2, high, low, high // 2 + 1, rng.choice(others), 3, 255, 1 << 20]
    return min(high, max(low, int(rng.choice(picks))))


def mutate(data: bytes, seed: int) -> tuple[bytes, str]:
    """One seeded mutation of a GGUF file's bytes, and what it changed."""
    rng = random.Random(seed)
    fields, header_end = header_fields(data)
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.8:
        f = rng.choice(fields)
        old = struct.unpack_from(f.fmt, data, f.pos)[0]
        others = [struct.unpack_from(g.fmt, data, g.pos)[0] for g in rng.sample(fields, 5) if g.fmt == f.fmt] or [old]
        new = _new_value(rng, old, f.fmt, others)
        struct.pack_into(f.fmt, out, f.pos, new)
        return bytes(out), f"{f.what}: {old} -> {new}"
    if roll < 0.9:
        at = rng.randrange(24, header_end)
        for i in range(rng.randint(1, 4)):
            out[min(at + i, header_end - 1)] = rng.randrange(256)
        return bytes(out), f"header bytes at {at} scrambled"
    at = rng.randrange(header_end, len(data))
    for i in range(rng.randint(1, 64)):
        out[min(at + i, len(data) - 1)] = rng.randrange(256)
    return bytes(out), f"block data at {at} scrambled"


def write_mutant(source: Path, target: Path, seed: int) -> str:
    data, what = mutate(source.read_bytes(), seed)
    target.write_bytes(data)
    return what
