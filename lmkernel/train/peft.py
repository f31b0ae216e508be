"""Parameter-efficient methods beside LoRA (`lmk train --peft KIND --peft-args k=v,...`): AdaLoRA, (IA)3,
prompt tuning, prefix tuning (Llama-family decoders) and bottleneck adapters. Each wraps a model for training and saves what trained as an
adapter directory that `load_model(BASE, adapter=DIR)` (and, but for bottleneck adapters, peft) loads.

    kind     --peft-args (defaults)                                          trains
    adalora  r=12,target_r=8,alpha=32,dropout=0.05,targets=..,tinit=0.1,     A, E, B of each target; rank
             tfinal=0.2,every=10,orth=0.5                                    budget r -> target_r
    ia3      targets=..,feedforward=..                                       one vector per target
    prompt   tokens=20                                                       [tokens, hidden] embeddings
    prefix   tokens=20                                                       every layer's keys and values
                                                                             at `tokens` virtual positions
    adapter  size=64,act=gelu,targets=..                                     a bottleneck MLP per target
    (tinit / tfinal: fractions of the run's steps before the budget starts falling / after it is final.)

The task's new head (a classifier) trains in full and is saved with the adapter (peft's modules_to_save).
LoRA itself lives in `train/lora.py`; `--lora SPEC` is `--peft lora --peft-args SPEC`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.layers.adalora import AdaLoraLinear
from lmkernel.layers.bottleneck import BottleneckLinear
from lmkernel.layers.ia3 import Ia3Linear
from lmkernel.layers.lora import linear_layers
from lmkernel.loader.adapter import PEFT_FORMAT_VERSION, PREFIX, hf_names, is_target, write_files
from lmkernel.loader.peft_kinds import PeftAdapter, PeftFields, write_peft_adapter
from lmkernel.models.virtual_tokens import PrefixTuned, PromptTuned, VirtualTokens
from lmkernel.train.adalora import RankAllocator
from lmkernel.train.lora import DEFAULT_TARGETS, parse_spec, saved_modules, saved_tensors

KINDS = ("lora", "adalora", "ia3", "prompt", "prefix", "adapter")
IA3_TARGETS = {"llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
               "bert": (("key", "value", "output.dense"), ("output.dense",))}  # peft's defaults; (targets, feed-forward)
ADAPTER_TARGETS = {"llama": ("o_proj", "down_proj"), "bert": ("output.dense",)}  # after attention and after the MLP

_KEYS: dict[str, dict[str, type]] = {
    "adalora": {"r": int, "target_r": int, "alpha": float, "dropout": float, "targets": tuple, "tinit": float,
                "tfinal": float, "every": int, "orth": float},
    "ia3": {"targets": tuple, "feedforward": tuple},
    "prompt": {"tokens": int},
    "prefix": {"tokens": int},
    "adapter": {"size": int, "act": str, "targets": tuple},
}


@dataclass(frozen=True)
class PeftSettings:
    """One method's settings; `values` holds the --peft-args given, the rest take the defaults above."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, kind: str, spec: str) -> PeftSettings:
        if kind not in _KEYS:
            raise AdapterError(f"--peft {kind!r}: expected one of {', '.join(KINDS)}")
        settings = cls(kind, parse_spec(spec, _KEYS[kind], f"--peft {kind} --peft-args"))
        settings.check()
        return settings

    def get(self, key: str, default: Any) -> Any:
        return self.values.get(key, default)

    def check(self) -> None:
        positive = {"r": 12, "target_r": 8, "every": 10, "tokens": 20, "size": 64}
        for key, default in positive.items():
            if key in _KEYS[self.kind] and not self.get(key, default) >= 1:
                raise AdapterError(f"--peft-args {key}={self.get(key, default)}: expected at least 1")
        if self.kind == "adalora":
            if self.get("target_r", 8) > self.get("r", 12):
                raise AdapterError(f"--peft-args target_r={self.get('target_r', 8)}: expected at most r={self.get('r', 12)}")
            if not 0 <= self.get("dropout", 0.05) < 1 or self.get("alpha", 32.0) <= 0:
                raise AdapterError("--peft-args: AdaLoRA dropout must be in [0, 1) and alpha positive")
            if not (0 <= self.get("tinit", 0.1) and 0 <= self.get("tfinal", 0.2) and self.get("tinit", 0.1) + self.get("tfinal", 0.2) < 1):
                raise AdapterError("--peft-args tinit and tfinal: fractions of the run, together below 1")
        if self.kind == "adapter" and self.get("act", "gelu") not in ("gelu", "relu", "silu"):
            raise AdapterError(f"--peft-args act={self.get('act', 'gelu')}: expected gelu, relu or silu")

    def targets(self, config: ModelConfig) -> tuple[str, ...]:
        table = {"adalora": DEFAULT_TARGETS, "ia3": {k: v[0] for k, v in IA3_TARGETS.items()}, "adapter": ADAPTER_TARGETS}
        if "targets" in self.values:
            return self.values["targets"]
        if config.architecture not in table.get(self.kind, {}):
            raise AdapterError(f"--peft {self.kind}: no default targets for a {config.architecture} model; "
                               "name them (--peft-args targets=a+b)")
        return table[self.kind][config.architecture]


@dataclass
class PeftRun:
    """A model wrapped for one method's training; `allocator` reallocates AdaLoRA's ranks."""

    settings: PeftSettings
    model: nn.Module
    wrapped: dict[str, str]  # our module name -> its Hugging Face name
    allocator: RankAllocator | None = None

    def extra_loss(self) -> torch.Tensor | None:
        return self.allocator.orthogonality() if self.allocator is not None else None

    def after_step(self, step: int) -> None:
        if self.allocator is not None:
            self.allocator.step(step)

    def save(self, out_dir: str | Path, base_model: str, task_type: str, modules_to_save: Sequence[str],
             hf_architecture: str, id2label: dict[int, str] | None) -> Path:
        inner = self.model.model if isinstance(self.model, VirtualTokens) else self.model
        config: ModelConfig = inner.config
        saved = saved_tensors(inner, config, modules_to_save, hf_architecture)
        kind, s = self.settings.kind, self.settings
        if kind == "adalora":
            return self._save_adalora(out_dir, base_model, task_type, modules_to_save, hf_architecture, id2label, saved)
        fields = {"task_type": task_type, "base_model_name_or_path": base_model, "modules_to_save": tuple(modules_to_save)}
        if kind in ("prompt", "prefix"):
            adapter = PeftAdapter("PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING",
                                  PeftFields(**fields, num_virtual_tokens=self.model.num_virtual_tokens),
                                  prompt=self.model.prompt_embeddings.detach(), saved=saved,
                                  hf_architecture=hf_architecture, id2label=id2label)
            # peft's prefix layout counts key/value heads (grouped-query attention) as its attention heads
            heads = config.num_heads if kind == "prompt" else config.num_kv_heads
            extra = {"num_layers": config.num_layers, "num_attention_heads": heads}
            return write_peft_adapter(out_dir, adapter, overwrite=True, extra=extra)
        modules = {}
        for name, hf in self.wrapped.items():
            m = inner.get_submodule(name)
            modules[hf] = {"ia3_l": m.ia3_l.detach()} if kind == "ia3" else \
                {f"{p}.{w}": getattr(m, p).get_parameter(w).detach() for p in ("adapter_down", "adapter_up") for w in ("weight", "bias")}
        targets = s.targets(config)
        if kind == "ia3":
            ff = s.get("feedforward", IA3_TARGETS.get(config.architecture, ((), ()))[1])
            peft_fields = PeftFields(**fields, target_modules=targets, feedforward_modules=ff)
            adapter = PeftAdapter("IA3", peft_fields, modules, saved=saved, hf_architecture=hf_architecture, id2label=id2label)
        else:
            peft_fields = PeftFields(**fields, target_modules=targets, adapter_size=s.get("size", 64),
                                     activation=s.get("act", "gelu"))
            adapter = PeftAdapter("BOTTLENECK", peft_fields, modules, saved=saved, hf_architecture=hf_architecture,
                                  id2label=id2label)
        return write_peft_adapter(out_dir, adapter, overwrite=True)

    def _save_adalora(self, out_dir: str | Path, base_model: str, task_type: str, modules_to_save: Sequence[str],
                      hf_architecture: str, id2label: dict[int, str] | None, saved: dict[str, torch.Tensor]) -> Path:
        """PEFT's AdaLoRA layout: each layer's kept triplets (rank_pattern) and A, E, B cut to them."""
        s, inner = self.settings, self.model
        tensors = {f"{PREFIX}{k}": v for k, v in saved.items()}
        pattern: dict[str, list[bool]] = {}
        for name, hf in self.wrapped.items():
            m: AdaLoraLinear = inner.get_submodule(name)
            keep = self.allocator.pattern[name].to(m.lora_E.device) if self.allocator is not None else \
                torch.ones(m.r, dtype=torch.bool)
            pattern[f"{hf}.lora_E"] = keep.tolist()
            tensors[f"{PREFIX}{hf}.lora_A"] = m.lora_A.detach()[keep]
            tensors[f"{PREFIX}{hf}.lora_E"] = m.lora_E.detach()[keep]
            tensors[f"{PREFIX}{hf}.lora_B"] = m.lora_B.detach()[:, keep]
        a = self.allocator
        config = {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "beta1": a.beta1 if a else 0.85,
            "beta2": a.beta2 if a else 0.85, "bias": "none", "deltaT": s.get("every", 10), "exclude_modules": None,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "init_r": s.get("r", 12),
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
            "lora_alpha": s.get("alpha", 32.0), "lora_bias": False, "lora_dropout": s.get("dropout", 0.05),
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": list(modules_to_save) or None,
            "orth_reg_weight": s.get("orth", 0.5), "peft_type": "ADALORA", "peft_version": PEFT_FORMAT_VERSION,
            "r": s.get("r", 12), "rank_pattern": pattern, "revision": None,
            "target_modules": list(s.targets(inner.config)), "target_r": s.get("target_r", 8),
            "task_type": task_type, "tfinal": a.tfinal if a else 0, "tinit": a.tinit if a else 0,
            "total_step": a.total if a else 1, "use_dora": False, "use_rslora": False,
        }
        return write_files(out_dir, config, tensors, hf_architecture, id2label, overwrite=True)


def start(model: nn.Module, settings: PeftSettings, modules_to_save: Sequence[str], seed: int,
          total_steps: int) -> PeftRun:
    """Wrap `model` for the method and freeze all but the method's parameters and `modules_to_save`."""
    config: ModelConfig = model.config
    saved = saved_modules(model, config, modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    kind, wrapped, allocator = settings.kind, {}, None
    if kind in ("prompt", "prefix"):
        torch.manual_seed(seed)
        try:
            run_model: nn.Module = (PromptTuned if kind == "prompt" else PrefixTuned)(model, settings.get("tokens", 20))
        except ValueError as exc:
            raise AdapterError(f"--peft {kind}: {exc}") from None
    else:
        layers = linear_layers(model)
        hf = hf_names(layers, config, config.hf_architecture)
        targets = settings.targets(config)
        chosen = [n for n in layers if is_target(hf[n], targets, tuple(modules_to_save))]
        if not chosen:
            ends = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers}))
            raise AdapterError(f"--peft {kind}: targets {targets!r} match no linear layer of this {config.architecture} "
                               f"model (its linear layers end in: {ends})")
        for name in chosen:
            base = layers[name]
            if not isinstance(base, nn.Linear):
                raise AdapterError(f"--peft {kind}: '{name}' is a {type(base).__name__}; it wraps float linear layers only")
            if kind == "adalora":
                layer: nn.Module = AdaLoraLinear(base, settings.get("r", 12), settings.get("alpha", 32.0),
                                                 settings.get("dropout", 0.05), generator)
            elif kind == "ia3":
                ff = settings.get("feedforward", IA3_TARGETS.get(config.architecture, ((), ()))[1])
                layer = Ia3Linear(base, is_target(hf[name], ff))
            else:
                layer = BottleneckLinear(base, settings.get("size", 64), settings.get("act", "gelu"), generator)
            model.set_submodule(name, layer)
            wrapped[name] = hf[name]
        run_model = model
        if kind == "adalora":
            tinit, tfinal = round(settings.get("tinit", 0.1) * total_steps), round(settings.get("tfinal", 0.2) * total_steps)
            allocator = RankAllocator({n: model.get_submodule(n) for n in chosen}, settings.get("target_r", 8), total_steps,
                                      tinit, tfinal, settings.get("every", 10), orth_weight=settings.get("orth", 0.5))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return PeftRun(settings, run_model, wrapped, allocator)


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters train (the table's 'trainable' column)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
