"""peft's adapter_config.json for LoRA (`AdapterConfig`), and target matching shared by every adapter kind:
which modules `target_modules` picks (`is_target`) as peft picks them, per-module rank and alpha patterns."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkernel.errors import AdapterError

PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose adapter_config.json keys `to_json` writes
OUTPUT_LAYERS = ("lm_head", "classifier", "score", "cls.predictions.decoder")  # never in "all-linear"
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
        return is_target(name, self.target_modules, self.modules_to_save, self.exclude_modules)

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
            "target_parameters": None, "task_type": self.task_type, "trainable_token_indices": None,  # nosec B105  # a token or tensor name, not a password
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
        targets = names_or_regex(raw, "target_modules", path, required=True)
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
            exclude_modules=names_or_regex(raw, "exclude_modules", path, required=False),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            inference_mode=bool(raw.get("inference_mode", True)),
        )


def is_target(name: str, targets: tuple[str, ...] | str, modules_to_save: tuple[str, ...] = (),
              exclude: tuple[str, ...] | str | None = None) -> bool:
    """Whether peft's `target_modules` (names matched at the end, a regular expression, or "all-linear")
    pick the module of this Hugging Face name, as peft matches them for every adapter kind."""
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str)
                    else name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if targets == "all-linear":
        return not any(name == o or name.endswith(f".{o}") for o in OUTPUT_LAYERS)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{k}") for k in targets)


def names_or_regex(raw: Mapping[str, Any], key: str, path: Path, required: bool) -> tuple[str, ...] | str | None:
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
