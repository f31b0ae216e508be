"""LoRA fine-tuning: wrap a model's linear layers with trainable adapters, save and load them in the
PEFT format (so peft reads what we write and we read what peft writes), and merge them into the weights.

    apply_lora(model, settings)            wrap the targets; only A, B and modules_to_save train
    save_adapter(model, settings, dir)     adapter_config.json + adapter_model.safetensors (+ sidecar)
    load_adapter(model, dir)               wrap and load, to continue training or to evaluate
    merge_lora(model)                      fold every adapter into a plain Dense
    merge_adapter_dir(base, dir, out)      base + adapter -> a Hugging Face model directory
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.layers.lora import LoraLinear, linear_layers
from lmkernel.loader.adapter import (
    AdapterConfig,
    LoraAdapter,
    head_architecture,
    hf_names,
    match_adapter,
    needs_head,
    read_adapter,
    to_peft_layout,
    write_adapter,
)
from lmkernel.loader.hf_export import prepare_output, save_model_dir
from lmkernel.loader.peft_kinds import PeftAdapter, read_any_adapter
from lmkernel.loading import load_model

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # Suffixes as peft matches them: "output.dense" is the layer's, "attention.output.dense" the
    # attention's; the pooler and the MLM head ("pooler.dense", "transform.dense") are not matched.
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
_SPEC_KEYS = {"r": int, "alpha": float, "dropout": float, "targets": tuple}
_SPEC_FIELDS = {"targets": "target_modules"}


def parse_spec(spec: str, keys: dict[str, type], what: str) -> dict[str, Any]:
    """"k=v,k=v" into typed values (`tuple`: names joined by "+"); errors name `what` and the expected keys."""
    values: dict[str, Any] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in keys or not value:
            raise AdapterError(f"{what} '{spec}': '{part}' is not one of {', '.join(f'{k}=...' for k in keys)}")
        try:
            values[key] = tuple(x.strip() for x in value.split("+")) if keys[key] is tuple else keys[key](value)
        except ValueError:
            raise AdapterError(f"{what} '{spec}': {key}={value} is not a number") from None
    return values


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale, dropout and target layers of a LoRA run; targets None: every attention and MLP projection."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterError(f"LoRA r must be a positive integer; got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterError(f"LoRA alpha must be a positive number; got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}")
        t = self.target_modules
        if t is not None and (isinstance(t, str) or not t or not all(isinstance(x, str) and x for x in t)):
            raise AdapterError(f"LoRA target_modules must be None or a non-empty tuple of module names; got {t!r}")

    @classmethod
    def parse(cls, spec: str) -> LoraSettings:
        """Settings from "r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj" (any subset; "" = defaults)."""
        values = parse_spec(spec, _SPEC_KEYS, "LoRA spec")
        return cls(**{_SPEC_FIELDS.get(k, k): v for k, v in values.items()})

    def targets(self, architecture: str) -> tuple[str, ...] | str:
        """The target module names (peft's target_modules) for a model of this architecture."""
        if self.target_modules == ("all-linear",):
            return "all-linear"
        if self.target_modules is not None:
            return self.target_modules
        if architecture not in DEFAULT_TARGETS:
            raise AdapterError(f"no default LoRA targets for architecture '{architecture}'; name them (targets=...)")
        return DEFAULT_TARGETS[architecture]

    def adapter_config(self, config: ModelConfig, base_model: str | None = None, task_type: str | None = None,
                       modules_to_save: Sequence[str] = ()) -> AdapterConfig:
        """peft's LoraConfig for these settings on a model of this config."""
        return AdapterConfig(
            r=self.r, lora_alpha=float(self.alpha), target_modules=self.targets(config.architecture),
            lora_dropout=float(self.dropout), task_type=task_type, modules_to_save=tuple(modules_to_save),
            base_model_name_or_path=base_model, fan_in_fan_out=config.architecture == "gpt2",  # peft's for Conv1D
        )


def _config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise AdapterError(f"{type(model).__name__} is not an lmkernel model (it has no ModelConfig)")
    return config


def saved_modules(model: nn.Module, config: ModelConfig, modules_to_save: Sequence[str]) -> list[str]:
    """Our names of the modules that train and are saved whole: each entry names a module, or ends one's name."""
    names = [n for n, _ in model.named_modules() if n]
    hf = hf_names(names, config, config.hf_architecture)
    out: list[str] = []
    for want in modules_to_save:
        found = [n for n in names if want in (n, hf[n]) or hf[n].endswith(f".{want}")]
        if not found:
            raise AdapterError(f"modules_to_save: this {config.architecture} model ({config.hf_architecture}) "
                               f"has no module '{want}'")
        out.extend(n for n in found if not any(n.startswith(f"{o}.") for o in found))
    return out


def saved_tensors(model: nn.Module, config: ModelConfig, modules_to_save: Sequence[str], arch: str) -> dict[str, torch.Tensor]:
    """The `modules_to_save` parameters by their Hugging Face names, in peft's layout."""
    saved: dict[str, torch.Tensor] = {}
    for name in saved_modules(model, config, modules_to_save):
        for key, t in model.get_submodule(name).state_dict().items():
            full = f"{name}.{key}"
            saved[hf_names([full], config, arch)[full]] = to_peft_layout(full, t, config)
    return saved


def apply_lora(model: nn.Module, settings: LoraSettings, modules_to_save: Sequence[str] = (), seed: int = 0) -> list[str]:
    """Wrap the target linear layers in `LoraLinear` in place and freeze everything else except the
    `modules_to_save` (a fresh classifier, say). Returns the wrapped names; A is drawn from `seed`."""
    config = _config(model)
    layers = linear_layers(model)
    adapter_config = settings.adapter_config(config, modules_to_save=modules_to_save)
    hf = hf_names(layers, config, config.hf_architecture)
    chosen = [n for n in layers if adapter_config.targets(hf[n])]
    if not chosen:
        ends = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers}))
        raise AdapterError(f"LoRA targets {adapter_config.target_modules!r} match no linear layer of this "
                           f"{config.architecture} model (its linear layers end in: {ends})")
    for name in chosen:
        if not isinstance(layers[name], nn.Linear) or isinstance(layers[name], LoraLinear):
            raise AdapterError(f"'{name}' is a {type(layers[name]).__name__}; LoRA training wraps float linear layers only")
    saved = saved_modules(model, config, modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in chosen:
        model.set_submodule(name, LoraLinear(layers[name], settings.r, settings.alpha, settings.dropout, generator))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return chosen


def save_adapter(model: nn.Module, settings: LoraSettings, out_dir: str | Path, base_model: str, task_type: str,
                 modules_to_save: Sequence[str] = (), hf_architecture: str | None = None,
                 id2label: dict[int, str] | None = None, overwrite: bool = False) -> Path:
    """Write the model's LoRA layers (and whole `modules_to_save`) as a PEFT adapter directory."""
    config = _config(model)
    arch = hf_architecture or config.hf_architecture
    adapter_config = settings.adapter_config(config, base_model, task_type, modules_to_save)
    layers = linear_layers(model)
    wrapped = {n: m for n, m in layers.items() if isinstance(m, LoraLinear)}
    if not wrapped:
        raise AdapterError("the model has no LoRA layers to save; call apply_lora (or load_adapter) first")
    hf = hf_names(layers, config, arch)
    expected = {n for n in layers if adapter_config.targets(hf[n])}
    if expected != set(wrapped) or any((m.r, m.alpha) != (settings.r, settings.alpha) for m in wrapped.values()):
        raise AdapterError(f"the model's LoRA layers are not those of these settings (r={settings.r}, "
                           f"alpha={settings.alpha:g}, targets {adapter_config.target_modules!r}); save with the "
                           "settings they were made with")
    lora = {hf[n]: (m.lora_A.detach(), m.lora_B.detach()) for n, m in wrapped.items()}
    saved = saved_tensors(model, config, modules_to_save, arch)
    labels = id2label if id2label is not None else (dict(config.id2label) or None)
    return write_adapter(out_dir, LoraAdapter(adapter_config, lora, saved, arch, labels), overwrite)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Wrap the adapter's layers in `LoraLinear` with its weights (trainable) and load its saved modules
    (trainable too); everything else is frozen. Returns the wrapped names."""
    config = _config(model)
    lora = read_adapter(adapter_dir)
    arch = head_architecture(lora, config)
    if needs_head(lora, config):
        raise AdapterError(f"{adapter_dir}: the adapter was made on a {arch}, this model is a {config.hf_architecture}; "
                           "load it with lmkernel.load_model(BASE, adapter=DIR), which builds the head")
    layers = linear_layers(model)
    targets = match_adapter(lora, {n: (m.in_features, m.out_features) for n, m in layers.items()}, config)
    for t in targets:
        if not isinstance(layers[t.name], nn.Linear) or isinstance(layers[t.name], LoraLinear):
            raise AdapterError(f"'{t.name}' is a {type(layers[t.name]).__name__}; LoRA wraps float linear layers only")
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        layer = LoraLinear(layers[t.name], t.rank, t.alpha, lora.config.lora_dropout, use_rslora=lora.config.use_rslora)
        with torch.no_grad():
            layer.lora_A.copy_(t.a)
            layer.lora_B.copy_(t.b)
        model.set_submodule(t.name, layer)
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    ours = {h: n for n, h in hf_names(state, config, arch).items()}
    for key, t in lora.saved.items():
        name = ours.get(key)
        value = to_peft_layout(name, t, config) if name is not None else t  # the transpose is its own inverse
        if name is None or tuple(state[name].shape) != tuple(value.shape):
            raise AdapterError(f"{lora.source}: tensor '{key}' (modules_to_save) has no parameter of that name "
                               f"and shape {tuple(value.shape)} in this model")
        with torch.no_grad():
            state[name].copy_(value)
        if name in params:
            params[name].requires_grad_(True)
    return [t.name for t in targets]


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every `LoraLinear` with its merged `Dense`, in place; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    distinct = len({id(p) for p in model.parameters()})
    for name in names:
        model.set_submodule(name, model.get_submodule(name).merged())
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig) and config.tie_word_embeddings and len({id(p) for p in model.parameters()}) > distinct:
        model.config = replace(config, tie_word_embeddings=False)  # a tied head got a weight of its own
    return names


def merge_adapter_dir(base: str, adapter_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Load `base`, merge the adapter (LoRA, AdaLoRA, IA3) into it (building a classification head where it
    has one) and write a Hugging Face directory that lmkernel and transformers load."""
    out_dir = Path(out_dir)
    kind = read_any_adapter(adapter_dir)
    if isinstance(kind, PeftAdapter) and kind.kind in ("PROMPT_TUNING", "BOTTLENECK"):
        why = ("adds virtual tokens before every sequence" if kind.kind == "PROMPT_TUNING"
               else "adds a non-linear layer after its targets")
        raise AdapterError(f"{adapter_dir}: a {kind.kind} adapter {why}, which no merge folds into the weights; "
                           "use the adapter directory itself as the model (load_model(DIR), `lmk serve DIR`)")
    prepare_output(out_dir, overwrite)
    lm = load_model(base, adapter=adapter_dir)
    return save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, out_dir, overwrite)
