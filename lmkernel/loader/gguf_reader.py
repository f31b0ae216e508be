"""A GGUF file's header read in one pass: metadata as Python values, tensors as memory-mapped arrays.

The `gguf` package's reader builds a numpy view per string and per array item, which takes about
4 s for a 49k-token vocabulary; this reads the same header from one buffer in a fraction of a
second. The tensor arrays have the shapes and dtypes the `gguf` package gives them, so its
dequantization reads them unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 40  # no real dimension comes near; larger ones only overflow the byte arithmetic
_TYPES = {int(t) for t in GGMLQuantizationType}

# GGUF value types: 0-7, 10-12 are scalars (numpy dtype), 8 a string, 9 an array.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
# Tensor types stored as plain numbers; every other type is blocks of bytes.
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # rows first, as numpy sees it (GGUF stores the dimensions the other way)
    n_elements: int
    data: np.ndarray  # a read-only view into the mapped file


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError(f"the header runs past the end of the file (at byte {self.pos}, {n} more needed)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return bytes(self.take(self.u64())).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: 150k of them), read in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError(f"the header runs past the end of the file (at byte {pos}, 8 more needed)")
            n = length(buf, pos)[0]
            pos += 8
            if pos + n > end:
                raise ValueError(f"the header runs past the end of the file (at byte {pos}, {n} more needed)")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item == _STRING:
                return self.strings(count)
            if item == _ARRAY:
                return [self.value(self.u32()) for _ in range(count)]
            values = np.frombuffer(self.take(count * np.dtype(self.dtype(item)).itemsize), self.dtype(item))
            return [bool(v) for v in values] if item == _BOOL else values.tolist()
        value = np.frombuffer(self.take(np.dtype(self.dtype(kind)).itemsize), self.dtype(kind))[0].item()
        return bool(value) if kind == _BOOL else value

    @staticmethod
    def dtype(kind: int) -> str:
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return _SCALARS[kind]


class GGUFFile:
    """The metadata (`metadata`, a dict) and tensors (`tensors`, in file order) of a GGUF file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A plain array over the mapping (slices of an np.memmap are memmaps too, and cost ten times more),
        # copy-on-write so that tensors made from it are writable without ever changing the file.
        self._map = np.memmap(path, dtype=np.uint8, mode="c").view(np.ndarray)
        cursor = _Cursor(memoryview(self._map))
        if bytes(cursor.take(4)) != MAGIC:
            raise ValueError("the file does not start with the GGUF magic bytes")
        self.version = cursor.u32()
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} (a big-endian file, or one this reader does not know)")
        tensor_count, kv_count = cursor.u64(), cursor.u64()
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.u32())
        infos, seen = [], set()
        for i in range(tensor_count):
            name = cursor.string()
            if name in seen:
                raise ValueError(f"tensor '{name}' is listed twice")
            seen.add(name)
            rank = cursor.u32()
            if not 1 <= rank <= MAX_DIMS:
                raise ValueError(f"tensor '{name}' has {rank} dimensions; expected 1 to {MAX_DIMS}")
            dims = [cursor.u64() for _ in range(rank)]
            kind = cursor.u32()
            if kind not in _TYPES:
                raise ValueError(f"tensor '{name}' has GGML type {kind}, which no GGUF reader knows")
            infos.append((name, dims, GGMLQuantizationType(kind), cursor.u64()))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment!r}; expected a power of two")
        start = -(-cursor.pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]
        self._check_overlaps(alignment, start)

    def _check_overlaps(self, alignment: int, start: int) -> None:
        """Tensors lie after the header, aligned, and no two share a byte (a crafted table could point
        several weights at one region, or a weight into the header)."""
        spans = sorted((t.data.ctypes.data - self._map.ctypes.data, t.data.nbytes, t.name) for t in self.tensors)
        end = start
        for offset, size, name in spans:
            if (offset - start) % alignment:
                raise ValueError(f"tensor '{name}' starts at byte {offset}, not on the file's {alignment}-byte alignment")
            if offset < end:
                raise ValueError(f"tensor '{name}' at byte {offset} overlaps the header or another tensor")
            end = offset + size

    def _tensor(self, name: str, dims: list[int], kind: GGMLQuantizationType, offset: int) -> GGUFTensor:
        shape = tuple(reversed(dims))
        if any(d < 1 or d > MAX_DIM for d in shape):
            raise ValueError(f"tensor '{name}' has shape {list(shape)}; every dimension must be 1 to {MAX_DIM}")
        n = int(np.prod(np.array(shape, dtype=object))) if shape else 1
        if kind in _PLAIN:
            dtype, count = np.dtype(_PLAIN[kind]), n
            array_shape = shape
        else:
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor '{name}' has GGML type {kind.name}, which has no block layout")
            block, size = GGML_QUANT_SIZES[kind]
            if shape[-1] % block:
                raise ValueError(f"tensor '{name}': a row of {shape[-1]} weights is not a whole number of "
                                 f"{kind.name} blocks of {block}")
            dtype, count = np.dtype(np.uint8), n * size // block
            array_shape = quant_shape_to_byte_shape(shape, kind)
        end = offset + count * dtype.itemsize
        if end > len(self._map):
            raise ValueError(f"tensor '{name}' runs past the end of the file ({end} > {len(self._map)} bytes)")
        data = self._map[offset:end].view(dtype).reshape(array_shape)
        return GGUFTensor(name, kind, shape, n, data)
