"""LoRA adapters in the PEFT on-disk format, read and written, so adapters move between lmkernel and peft.

    adapter_config.json          peft's LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight [out, r],
                                 and whole modules_to_save tensors as base_model.model.<module>.<param>
    lmkernel_adapter.json        what peft does not store and we need to rebuild the model: the Hugging
                                 Face architecture (a classification head) and its labels; optional

Module names are Hugging Face's, which ours equal except that a bare BertModel's lack our `bert.`
prefix (`hf_names`). Targets match as peft matches them (`AdapterConfig.targets`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.loader.hf_dir import check_safetensors, read_json
from lmkernel.loader.hf_export import prepare_output, publish

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "lmkernel_adapter.json"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose adapter_config.json keys `to_json` writes
OUTPUT_LAYERS = ("lm_head", "classifier", "score", "cls.predictions.decoder")  # never in "all-linear"
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 modules stored [in, out]
# peft features that change what the adapter computes; lmkernel refuses them rather than ignore them.
_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "layer_replication",
                "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
                "use_bdlora", "arrow_config")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of peft's LoraConfig that decide what a LoRA adapter computes and where."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    lora_dropout: float = 0.0
    task_type: str | None = None
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    exclude_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    inference_mode: bool = True

    def targets(self, name: str) -> bool:
        """Whether peft puts LoRA on the module of this Hugging Face name."""
        ex = self.exclude_modules
        if ex and (re.fullmatch(ex, name) if isinstance(ex, str) else name in ex or any(name.endswith(f".{e}") for e in ex)):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save):
            return False
        t = self.target_modules
        if t == "all-linear":
            return not any(name == o or name.endswith(f".{o}") for o in OUTPUT_LAYERS)
        if isinstance(t, str):
            return re.fullmatch(t, name) is not None
        return name in t or any(name.endswith(f".{k}") for k in t)

    def rank(self, name: str) -> int:
        return int(_pattern_value(self.rank_pattern, name, self.r))

    def alpha(self, name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, name, self.lora_alpha))

    def to_json(self) -> dict[str, Any]:
        """adapter_config.json as peft 0.21 writes it: every key, ours filled in, peft's defaults elsewhere."""
        out: dict[str, Any] = {
            "alora_invocation_tokens": None, "alpha_pattern": dict(self.alpha_pattern), "arrow_config": None,
            "auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path, "bias": "none",
            "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
            "exclude_modules": list(self.exclude_modules) if isinstance(self.exclude_modules, tuple) else self.exclude_modules,
            "fan_in_fan_out": self.fan_in_fan_out, "inference_mode": self.inference_mode, "init_lora_weights": True,
            "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
            "loftq_config": {}, "lora_alpha": self.lora_alpha, "lora_bias": False, "lora_dropout": self.lora_dropout,
            "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": list(self.modules_to_save) or None, "monteclora_config": None, "peft_type": "LORA",
            "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": self.r,
            "rank_pattern": dict(self.rank_pattern), "revision": None,
            "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            "target_parameters": None, "task_type": self.task_type, "trainable_token_indices": None,
            "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": self.use_rslora,
            "velora_config": None,
        }
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], path: Path) -> AdapterConfig:
        """Validate adapter_config.json; errors name the file and the field."""
        def bad(key: str, expected: str) -> AdapterError:
            return AdapterError(f"{path}: field '{key}' is {raw.get(key)!r}; expected {expected}")

        if raw.get("peft_type") != "LORA":
            raise bad("peft_type", "'LORA' (lmkernel reads LoRA adapters only)")
        for key in _UNSUPPORTED:
            if raw.get(key):
                raise AdapterError(f"{path}: field '{key}' is {raw[key]!r}; lmkernel supports plain LoRA only, without it")
        init = str(raw.get("init_lora_weights", True)).lower()
        if init.startswith(("pissa", "olora", "corda", "loftq")):  # these change the base weights too
            raise bad("init_lora_weights", "an adapter on the unchanged base (convert it with peft's "
                      "path_initial_model_for_weight_conversion)")
        if raw.get("bias", "none") != "none":
            raise bad("bias", "'none' (lmkernel does not train or load biases of LoRA layers)")
        r = raw.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise bad("r", "a positive integer")
        alpha = raw.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise bad("lora_alpha", "a number")
        targets = _names_or_regex(raw, "target_modules", path, required=True)
        dropout = raw.get("lora_dropout", 0.0)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        saved = raw.get("modules_to_save") or []
        if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
            raise bad("modules_to_save", "null or a list of module names")
        for key in ("rank_pattern", "alpha_pattern"):
            value = raw.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
                raise bad(key, "an object of module patterns to numbers")
        base = raw.get("base_model_name_or_path")
        return cls(
            r=r, lora_alpha=float(alpha), target_modules=targets, lora_dropout=float(dropout),
            task_type=raw.get("task_type"), modules_to_save=tuple(saved),
            base_model_name_or_path=str(base) if base else None, use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            exclude_modules=_names_or_regex(raw, "exclude_modules", path, required=False),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            inference_mode=bool(raw.get("inference_mode", True)),
        )


def _names_or_regex(raw: Mapping[str, Any], key: str, path: Path, required: bool) -> tuple[str, ...] | str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if isinstance(value, str) and value:
        try:
            re.compile(value)
        except re.error as exc:
            raise AdapterError(f"{path}: field '{key}' is not a valid regular expression ({exc})") from None
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    if isinstance(value, list) and not value and not required:
        return None
    raise AdapterError(f"{path}: field '{key}' is {value!r}; expected a list of module names or a regular expression")


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first pattern matching the name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class LoraAdapter:
    """An adapter in memory: its config, A and B per module, whole saved modules, and the sidecar's facts.

    Names are Hugging Face's: `lora` maps module names to (A [r, in], B [out, r]), `saved` parameter
    names to tensors, each in peft's layout.
    """

    config: AdapterConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    hf_architecture: str | None = None
    id2label: dict[int, str] | None = None
    path: Path | None = None

    @property
    def source(self) -> str:
        return str(self.path / WEIGHTS_FILE) if self.path is not None else "adapter"


def read_adapter(directory: str | Path) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory; every error names the file and the field or tensor."""
    directory = Path(directory)
    try:
        directory = directory.expanduser()
    except RuntimeError:  # "~name" of no such user: the path as written
        pass
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        found = config_path.is_file()
    except OSError as exc:  # a name too long, a directory we may not read, ...
        raise AdapterError(f"{directory}: cannot read it as an adapter directory ({exc.strerror})") from None
    if not found:
        raise AdapterError(f"{directory}: no {CONFIG_FILE}; expected a PEFT LoRA adapter directory")
    config = AdapterConfig.from_json(read_json(config_path, AdapterError), config_path)
    if not weights_path.is_file():
        other = " (adapter_model.bin is not read: convert it to safetensors)" if (directory / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}{other}")
    check_safetensors(weights_path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except SafetensorError as exc:
        raise AdapterError(f"{weights_path}: cannot read safetensors file ({exc})") from None
    lora, saved = _split(tensors, config, weights_path)
    arch, labels = _read_sidecar(directory / SIDECAR_FILE)
    return LoraAdapter(config, lora, saved, arch, labels, directory)


def _split(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, path: Path) -> tuple[dict, dict]:
    """peft's keys into (module -> (A, B)) and (parameter -> tensor), with the factor shapes checked."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{path}: tensor '{key}' does not start with '{PREFIX}' as peft's keys do")
        name = key[len(PREFIX):]
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise AdapterError(f"{path}: tensor '{key}' is a LoRA embedding or DoRA tensor; lmkernel loads LoRA on linear layers only")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if m is None:
            saved[name] = t
            continue
        if t.dim() != 2:
            raise AdapterError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}; expected a matrix")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterError(f"{path}: '{PREFIX}{module}.{missing}.weight' is missing (the other factor is present)")
        a, b = ab["lora_A"], ab["lora_B"]
        r = config.rank(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"{path}: '{PREFIX}{module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                               f"do not have rank {r} from field 'r' (or 'rank_pattern') of {CONFIG_FILE}")
        lora[module] = (a, b)
    if not lora:
        raise AdapterError(f"{path}: no lora_A / lora_B tensors")
    return lora, saved


def _read_sidecar(path: Path) -> tuple[str | None, dict[int, str] | None]:
    if not path.is_file():
        return None, None
    raw = read_json(path, AdapterError)
    arch = raw.get("hf_architecture")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise AdapterError(f"{path}: field 'hf_architecture' is {arch!r}; expected a name such as '{CLASSIFIER_ARCHITECTURE}'")
    labels = raw.get("id2label")
    if labels is None:
        return arch, None
    try:
        return arch, {int(k): str(v) for k, v in dict(labels).items()}
    except (TypeError, ValueError):
        raise AdapterError(f"{path}: field 'id2label' is {labels!r}; expected an object of class ids to names") from None


def write_adapter(directory: str | Path, adapter: LoraAdapter, overwrite: bool = False) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and the sidecar; all appear or none do."""
    out_dir = Path(directory)
    prepare_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{PREFIX}{k}": v for k, v in adapter.saved.items()}
    for name, (a, b) in adapter.lora.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # tied tensors stored apart
    sidecar: dict[str, Any] = {"hf_architecture": adapter.hf_architecture}
    if adapter.id2label:
        sidecar["id2label"] = {str(k): v for k, v in adapter.id2label.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config.to_json(), indent=2))
        (tmp / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def head_architecture(adapter: LoraAdapter, config: ModelConfig) -> str:
    """The Hugging Face architecture the adapter was made on: the sidecar's, else inferred (a peft
    SEQ_CLS adapter on BERT is a BertForSequenceClassification), else the base model's."""
    if adapter.hf_architecture:
        return adapter.hf_architecture
    if config.architecture == "bert" and adapter.config.task_type == "SEQ_CLS":
        return CLASSIFIER_ARCHITECTURE
    return config.hf_architecture


def needs_head(adapter: LoraAdapter, config: ModelConfig) -> bool:
    """Whether the adapter was made on another head than the base model has (a BERT classifier on
    a bare encoder); a decoder has one head whatever its architecture is called."""
    arch, bare = head_architecture(adapter, config), ("", "BertModel")
    if config.architecture != "bert" or arch == config.hf_architecture:
        return False
    return not (arch in bare and config.hf_architecture in bare)


def head_labels(adapter: LoraAdapter, config: ModelConfig) -> dict[int, str]:
    """Class labels of a classification adapter: the sidecar's, else LABEL_i for each classifier row."""
    if adapter.id2label:
        return dict(adapter.id2label)
    weight = adapter.saved.get("classifier.weight")
    if weight is not None:
        return {i: f"LABEL_{i}" for i in range(weight.shape[0])}
    return dict(config.id2label)


def hf_names(names: Iterable[str], config: ModelConfig, hf_architecture: str) -> dict[str, str]:
    """Our module or parameter name -> its Hugging Face name in a model of `hf_architecture`."""
    bare = config.architecture == "bert" and hf_architecture in ("", "BertModel")
    return {n: (n[len("bert."):] if bare and n.startswith("bert.") else n) for n in names}


def to_peft_layout(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A parameter as peft saves it: GPT-2's Conv1D weights transposed to [in, out]; others as they are."""
    if config.architecture == "gpt2" and name.endswith(tuple(f"{m}.weight" for m in _CONV1D)):
        return tensor.t().contiguous()
    return tensor


@dataclass(frozen=True)
class LoraTarget:
    """One adapted layer: our module name, its factors and its scaling."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    rank: int
    alpha: float


def match_adapter(adapter: LoraAdapter, linears: Mapping[str, tuple[int, int]], config: ModelConfig) -> list[LoraTarget]:
    """Place the adapter's factors on our linear layers (name -> (in, out)), checking names and shapes."""
    cfg = adapter.config
    hf = hf_names(linears, config, head_architecture(adapter, config))
    ours = {h: n for n, h in hf.items()}
    if not any(cfg.targets(h) for h in ours):
        raise AdapterError(f"{adapter.path / CONFIG_FILE if adapter.path else 'adapter'}: field 'target_modules' "
                           f"{cfg.target_modules!r} matches no linear layer of this {config.architecture} model "
                           f"(its layers end in: {', '.join(sorted({h.rsplit('.', 1)[-1] for h in ours}))})")
    out = []
    for module, (a, b) in sorted(adapter.lora.items()):
        name = ours.get(module)
        if not cfg.targets(module):  # peft would leave these tensors unused; a file at odds with its config
            raise AdapterError(f"{adapter.source}: tensor '{PREFIX}{module}.lora_A.weight' is for module '{module}', "
                               f"which field 'target_modules' ({cfg.target_modules!r}) of {CONFIG_FILE} does not target")
        if name is None:
            raise AdapterError(f"{adapter.source}: tensor '{PREFIX}{module}.lora_A.weight' is for module '{module}', "
                               f"which this {config.architecture} model ({config.hf_architecture}) has no linear layer for")
        fan_in, fan_out = linears[name]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(f"{adapter.source}: '{PREFIX}{module}': lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)} do not fit the layer's {fan_in} inputs and {fan_out} outputs")
        r, alpha = cfg.rank(module), cfg.alpha(module)
        scaling = alpha / r ** 0.5 if cfg.use_rslora else alpha / r
        out.append(LoraTarget(name, a, b, scaling, r, alpha))
    return out
