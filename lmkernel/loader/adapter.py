"""LoRA adapters in the PEFT on-disk format, read and written, so adapters move between lmkernel and peft.

    adapter_config.json          peft's LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, ...;
                                 `adapter_config.py`), or an AdaLoRA config, read as the LoRA update it computes
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
from lmkernel.loader.adapter_config import (  # noqa: F401  (re-exported: the adapter's config lives beside it)
    OUTPUT_LAYERS, PEFT_FORMAT_VERSION, AdapterConfig, is_target, names_or_regex,
)
from lmkernel.loader.hf_dir import check_safetensors, read_json
from lmkernel.loader.hf_export import prepare_output, publish

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "lmkernel_adapter.json"
PREFIX = "base_model.model."
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 modules stored [in, out]


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
    kind: str = "LORA"  # or "ADALORA", read as the LoRA update it computes

    @property
    def source(self) -> str:
        return str(self.path / WEIGHTS_FILE) if self.path is not None else "adapter"


def open_adapter_dir(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """An adapter directory and its adapter_config.json, read; errors name the directory or the file."""
    directory = Path(directory)
    try:
        directory = directory.expanduser()
    except RuntimeError:  # "~name" of no such user: the path as written
        pass
    config_path = directory / CONFIG_FILE
    try:
        found = config_path.is_file()
    except OSError as exc:  # a name too long, a directory we may not read, ...
        raise AdapterError(f"{directory}: cannot read it as an adapter directory ({exc.strerror})") from None
    if not found:
        raise AdapterError(f"{directory}: no {CONFIG_FILE}; expected a PEFT adapter directory")
    return directory, read_json(config_path, AdapterError)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's adapter_model.safetensors, checked against its header first."""
    weights_path = directory / WEIGHTS_FILE
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
    return tensors


def read_adapter(directory: str | Path) -> LoraAdapter:
    """Read and check a PEFT LoRA or AdaLoRA adapter directory (AdaLoRA as the LoRA update it computes);
    every error names the file and the field or tensor."""
    directory, raw = open_adapter_dir(directory)
    config_path = directory / CONFIG_FILE
    kind = raw.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        shape = "keeps the model's shapes: it is served merged (`lmk serve DIR`, or `lmk lora merge BASE DIR -o OUT`)" \
            if kind in ("IA3", "BOTTLENECK") else "adds tokens to the context and has no per-request form"
        raise AdapterError(f"{config_path}: field 'peft_type' is {kind!r}; only LoRA and AdaLoRA adapters are "
                           f"applied per request or wrapped for training here (a {kind} adapter {shape})")
    tensors = read_weights(directory)
    if kind == "ADALORA":
        config, tensors = _adalora_as_lora(raw, tensors, config_path)
    else:
        config = AdapterConfig.from_json(raw, config_path)
    lora, saved = _split(tensors, config, directory / WEIGHTS_FILE)
    arch, labels = read_sidecar(directory / SIDECAR_FILE)
    return LoraAdapter(config, lora, saved, arch, labels, directory, kind)


def _adalora_as_lora(raw: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     path: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """An AdaLoRA adapter as the LoRA update it computes: A' = (A * E) * alpha / (r0 + 1e-5) (PEFT's scaling
    with `ranknum` = the initial rank r0), B as is, and per module its kept rank with a scaling of 1."""
    init_r = raw.get("init_r")
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
        raise AdapterError(f"{path}: field 'init_r' is {init_r!r}; expected a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{path}: field 'lora_alpha' is {alpha!r}; expected a number")
    scaling = (alpha if alpha > 0 else float(init_r)) / (init_r + 1e-5)  # as layers/adalora.py computes it
    factors: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        head, _, part = key.rpartition(".")
        if part in ("lora_A", "lora_B", "lora_E") and head.startswith(PREFIX):
            factors.setdefault(head, {})[part] = t
        else:
            out[key] = t
    ranks: dict[str, int] = {}
    for head, f in factors.items():
        if set(f) != {"lora_A", "lora_B", "lora_E"}:
            missing = sorted({"lora_A", "lora_B", "lora_E"} - set(f))
            raise AdapterError(f"{path.parent / WEIGHTS_FILE}: '{head}' lacks {', '.join(missing)}")
        a, b, e = f["lora_A"], f["lora_B"], f["lora_E"]
        if a.dim() != 2 or b.dim() != 2 or tuple(e.shape) != (a.shape[0], 1) or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{path.parent / WEIGHTS_FILE}: '{head}': lora_A {tuple(a.shape)}, lora_E "
                               f"{tuple(e.shape)} and lora_B {tuple(b.shape)} are not A [r, in], E [r, 1], B [out, r]")
        if a.shape[0] == 0:
            continue  # every triplet of this layer was pruned: no update
        out[f"{head}.lora_A.weight"] = (a.float() * e.float() * scaling).to(a.dtype)
        out[f"{head}.lora_B.weight"] = b
        ranks[re.escape(head[len(PREFIX):])] = int(a.shape[0])
    lora_raw = {**raw, "peft_type": "LORA", "r": init_r, "lora_alpha": float(init_r), "rank_pattern": ranks,
                "alpha_pattern": dict(ranks), "use_rslora": False}
    return AdapterConfig.from_json(lora_raw, path), out


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


def read_sidecar(path: Path) -> tuple[str | None, dict[int, str] | None]:
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
    tensors = {f"{PREFIX}{k}": v for k, v in adapter.saved.items()}
    for name, (a, b) in adapter.lora.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    return write_files(directory, adapter.config.to_json(), tensors, adapter.hf_architecture, adapter.id2label, overwrite)


def write_files(directory: str | Path, config_json: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                hf_architecture: str | None, id2label: Mapping[int, str] | None, overwrite: bool = False) -> Path:
    """An adapter directory of any kind: its config, its tensors (keys as given) and the sidecar, published
    by one rename so that all appear or none do."""
    out_dir = Path(directory)
    prepare_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # tied tensors stored apart
    sidecar: dict[str, Any] = {"hf_architecture": hf_architecture}
    if id2label:
        sidecar["id2label"] = {str(k): v for k, v in id2label.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config_json), indent=2))
        (tmp / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def head_architecture(adapter: Any, config: ModelConfig) -> str:
    """The Hugging Face architecture the adapter was made on: the sidecar's, else inferred (a peft SEQ_CLS
    adapter is a BertForSequenceClassification on BERT, a ...ForSequenceClassification on a decoder), else
    the base model's."""
    if adapter.hf_architecture:
        return adapter.hf_architecture
    if adapter.config.task_type == "SEQ_CLS" and config.architecture == "bert":
        return CLASSIFIER_ARCHITECTURE
    if adapter.config.task_type == "SEQ_CLS" and config.architecture == "llama":
        return config.hf_architecture.replace("ForCausalLM", "ForSequenceClassification")
    return config.hf_architecture


def needs_head(adapter: Any, config: ModelConfig) -> bool:
    """Whether the adapter was made on another head than the base model has (a classifier on a bare
    encoder or on a decoder); a decoder's language-model head goes by several architecture names."""
    arch, bare = head_architecture(adapter, config), ("", "BertModel")
    if arch == config.hf_architecture:
        return False
    if config.architecture != "bert":
        return arch.endswith("ForSequenceClassification") and not config.is_classifier
    return not (arch in bare and config.hf_architecture in bare)


def head_labels(adapter: Any, config: ModelConfig) -> dict[int, str]:
    """Class labels of a classification adapter: the sidecar's, else LABEL_i for each classifier row."""
    if adapter.id2label:
        return dict(adapter.id2label)
    weight = adapter.saved.get("classifier.weight", adapter.saved.get("score.weight"))
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
