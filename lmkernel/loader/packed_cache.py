"""The decode layout of a GGUF file's k-quant layers (`GGUFLinear.pack`), kept on disk after the first load
so that later loads map it instead of packing again (packing the 1.5B's 1.1 GB takes ~0.9 s; mapping it,
nothing until the pages are read).

One file per GGUF file (`<stem>-<hash of its path>.lmkpack` in the cache directory): a magic, the length of
a JSON header, the header (the key: the GGUF's path, size and modification time and the layout's version;
each layer's ggml type, shape and offset), then each layer's bytes at a page boundary. Written to a
temporary name, flushed and renamed, so a reader sees a whole file or none; read as hostile anyway: every
offset and shape is checked against the file and against the layers the model expects before a byte of
it reaches a kernel. A file that does not match is rewritten, never an error: the cache only saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MAGIC = b"LMKPACK\x00"
LAYOUT_VERSION = 1  # gguf_x16's layout; a change to it must bump this
PAGE = 4096
MAX_HEADER = 16 << 20
SUFFIX = ".lmkpack"
MADV_POPULATE_READ = 22  # Linux 5.14; Python's mmap module names it from 3.13
WRITER = "lmkernel-packed-cache"  # the name of the threads `write_in_background` starts


@dataclass(frozen=True)
class PackedLayer:
    """What the model expects of one packed layer: its ggml type and the packed tensor's shape."""

    gguf_type: int
    shape: tuple[int, int]


def cache_file(directory: Path, gguf: Path) -> Path:
    """Where the packed layers of `gguf` are kept in `directory`."""
    resolved = gguf.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return directory / f"{resolved.stem}-{digest}{SUFFIX}"


def source_key(gguf: Path) -> dict[str, object]:
    """What a cache file must have been made from: this GGUF file as it is now, and this layout."""
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "layout": LAYOUT_VERSION}


def read(directory: Path, gguf: Path, expected: dict[str, PackedLayer]) -> dict[str, torch.Tensor] | None:
    """The packed layers (uint8 tensors over the mapped cache file) if `directory` holds a file made from
    `gguf` as it is now with exactly the `expected` layers; None otherwise (with a log line saying why when
    a file was there)."""
    path = cache_file(directory, gguf)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) != len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                return _stale(path, "not a packed-layers file")
            (length,) = struct.unpack("<Q", head[len(MAGIC):])
            if length > MAX_HEADER or len(MAGIC) + 8 + length > size:
                return _stale(path, f"a header of {length} bytes does not fit the file's {size}")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return _stale(path, f"unreadable ({exc})")
    if not isinstance(header, dict) or header.get("key") != source_key(gguf):
        return _stale(path, "made from another version of the GGUF file or another layout")
    layers = header.get("layers")
    if not isinstance(layers, dict) or set(layers) != set(expected):
        return _stale(path, "holds other layers than this model packs")
    data_start = len(MAGIC) + 8 + length
    spans = []
    for name, want in expected.items():
        entry = layers[name]
        try:
            gguf_type, shape, offset = int(entry["type"]), tuple(int(v) for v in entry["shape"]), int(entry["offset"])
        except (KeyError, TypeError, ValueError):
            return _stale(path, f"layer '{name}': expected type, shape and offset")
        nbytes = shape[0] * shape[1] if len(shape) == 2 else -1
        if gguf_type != want.gguf_type or shape != want.shape:
            return _stale(path, f"layer '{name}': type {gguf_type} shape {shape}, expected {want.gguf_type} {want.shape}")
        if offset < data_start or offset % PAGE or offset + nbytes > size:
            return _stale(path, f"layer '{name}': {nbytes} bytes at {offset} lie outside the file's {size}")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    if any(end > start for (_, end, _), (start, _, _) in zip(spans, spans[1:])):
        return _stale(path, "two layers' bytes overlap")
    with path.open("rb") as f:  # copy-on-write, as the GGUF is mapped
        region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:  # the first token reads every page: fault them in as one batch, not one fault a page
        region.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError):  # kernels before 5.14
        region.madvise(mmap.MADV_WILLNEED)
    mapped = np.frombuffer(region, dtype=np.uint8)
    return {name: torch.from_numpy(mapped[start:end].reshape(expected[name].shape)) for start, end, name in spans}


def _stale(path: Path, why: str) -> None:
    log.info("lmkernel: %s: %s; packing again", path, why)
    return None


def write(directory: Path, gguf: Path, layers: dict[str, tuple[int, torch.Tensor]]) -> Path | None:
    """Keep `layers` ({name: (ggml type, packed uint8 tensor)}) made from `gguf` in `directory`: written whole
    under a temporary name, flushed, then renamed over any older file. Where the disk lacks the room or
    refuses the write, a log line and None: the next load packs again."""
    path = cache_file(directory, gguf)
    entries: dict[str, dict[str, object]] = {}
    offset = 0
    for name, (gguf_type, t) in layers.items():
        entries[name] = {"type": gguf_type, "shape": list(t.shape), "offset": offset}
        offset += -(-t.numel() // PAGE) * PAGE
    relative = offset
    # The data starts at the first page after the header, whose length depends on the offsets it holds:
    # measured with every offset 13 digits long, an upper bound for files under a terabyte.
    start = PAGE * -(-(len(MAGIC) + 8 + len(_header(gguf, entries, 10 ** 12))) // PAGE)
    for e in entries.values():
        e["offset"] = int(e["offset"]) + start
    header = _header(gguf, entries, 0)
    total = start + relative
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(directory).free < total + (1 << 30):
            log.info("lmkernel: %s: %.1f GB free, the packed layers need %.1f GB and 1 GB to spare; not kept",
                     directory, shutil.disk_usage(directory).free / 1e9, total / 1e9)
            return None
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                for name, (_, t) in layers.items():
                    f.seek(int(entries[name]["offset"]))
                    f.write(memoryview(t.contiguous().numpy()).cast("B"))
                f.truncate(total)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.info("lmkernel: could not keep the packed layers in %s (%s); the next load packs again", directory, exc)
        return None
    drop_orphans(directory)
    return path


def drop_orphans(directory: Path) -> list[Path]:
    """Remove the cache files in `directory` whose GGUF file is gone (or that name none), and temporary
    files a killed writer left over an hour ago, so files of deleted or moved models do not pile up; the
    ones removed."""
    removed = []
    for path in directory.glob(f".*{SUFFIX}.*.tmp"):
        try:
            if time.time() - path.stat().st_mtime > 3600:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            with path.open("rb") as f:
                head = f.read(len(MAGIC) + 8)
                length = struct.unpack("<Q", head[len(MAGIC):])[0] if len(head) == len(MAGIC) + 8 else 0
                header = json.loads(f.read(length)) if head[: len(MAGIC)] == MAGIC and length <= MAX_HEADER else None
            source = header.get("key", {}).get("gguf") if isinstance(header, dict) else None
            if not isinstance(source, str) or not Path(source).is_file():
                path.unlink()
                removed.append(path)
        except (OSError, ValueError, AttributeError):
            continue
    return removed


def write_in_background(directory: Path, gguf: Path, layers: dict[str, tuple[int, torch.Tensor]]) -> threading.Thread:
    """`write` on a thread of its own (named WRITER; not a daemon, so the process waits for it at exit), so
    the first load of a file is not charged for ~1 s of writing and flushing its packed layers."""
    thread = threading.Thread(target=write, args=(directory, gguf, dict(layers)), name=WRITER)
    thread.start()
    return thread


def _header(gguf: Path, entries: dict[str, dict[str, object]], pad: int) -> bytes:
    """The JSON header, every offset moved by `pad`."""
    layers = {n: {**e, "offset": int(e["offset"]) + pad} for n, e in entries.items()}
    return json.dumps({"key": source_key(gguf), "layers": layers}, separators=(",", ":")).encode()
