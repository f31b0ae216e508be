"""The adapter kinds beside LoRA, read and written in the PEFT format (IA3, prompt tuning) or in our
own documented one (bottleneck adapters, which PEFT lacks). AdaLoRA is read in `adapter.py`, as the
LoRA update it computes.

    IA3            adapter_config.json: peft_type "IA3", target_modules, feedforward_modules
                   tensors base_model.model.<module>.ia3_l: [out, 1], or [1, in] for feed-forward modules
    PROMPT_TUNING  adapter_config.json: peft_type "PROMPT_TUNING", num_virtual_tokens, token_dim, ...
                   tensor prompt_embeddings [num_virtual_tokens, token_dim]; saved modules (a classifier)
                   as base_model.<module>.<param>
    PREFIX_TUNING  adapter_config.json: peft_type "PREFIX_TUNING", num_virtual_tokens, num_layers, token_dim
                   (the key/value width), prefix_projection false; tensor prompt_embeddings
                   [num_virtual_tokens, num_layers * 2 * token_dim]
    BOTTLENECK     (lmkernel's) adapter_config.json: peft_type "BOTTLENECK", "format": "lmkernel-bottleneck/1",
                   adapter_size, activation, target_modules (each gets an adapter after its output)
                   tensors base_model.model.<module>.adapter_down.{weight [size, out], bias [size]},
                   ...adapter_up.{weight [out, size], bias [out]}; saved modules as LoRA's

Every directory may carry lmkernel_adapter.json (the head's architecture and labels), as LoRA's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmkernel.errors import AdapterError
from lmkernel.loader.adapter import (
    CONFIG_FILE, PEFT_FORMAT_VERSION, PREFIX, SIDECAR_FILE, WEIGHTS_FILE, LoraAdapter, is_target, names_or_regex,
    open_adapter_dir, read_adapter, read_sidecar, read_weights, write_files,
)

KINDS = ("LORA", "ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK")
VIRTUAL = ("PROMPT_TUNING", "PREFIX_TUNING")  # kinds that put learned values at virtual positions
BOTTLENECK_FORMAT = "lmkernel-bottleneck/1"
PROMPT_PREFIX = "base_model."  # prompt learning saves a classifier as base_model.<module>, not base_model.model.


@dataclass(frozen=True)
class PeftFields:
    """What every kind's adapter_config.json says about where it applies and what it was made on."""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    modules_to_save: tuple[str, ...] = ()
    target_modules: tuple[str, ...] | str = ()
    feedforward_modules: tuple[str, ...] | str = ()  # IA3: modules scaled at their input
    num_virtual_tokens: int = 0  # prompt tuning
    adapter_size: int = 0  # bottleneck
    activation: str = "gelu"  # bottleneck

    def targets(self, name: str) -> bool:
        return bool(self.target_modules) and is_target(name, self.target_modules, self.modules_to_save)

    def feedforward(self, name: str) -> bool:
        return bool(self.feedforward_modules) and is_target(name, self.feedforward_modules)


@dataclass
class PeftAdapter:
    """An IA3, prompt- or prefix-tuning or bottleneck adapter in memory; names are Hugging Face's (see `hf_names`).

    `modules` maps each adapted module to its tensors ({"ia3_l": ...} or {"adapter_down.weight": ...});
    `prompt` is the prompt-tuning embeddings; `saved` holds whole saved modules' parameters.
    """

    kind: str
    config: PeftFields
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    prompt: torch.Tensor | None = None
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    hf_architecture: str | None = None
    id2label: dict[int, str] | None = None
    path: Path | None = None

    @property
    def source(self) -> str:
        return str(self.path / WEIGHTS_FILE) if self.path is not None else "adapter"


def read_any_adapter(directory: str | Path) -> LoraAdapter | PeftAdapter:
    """Any adapter directory lmkernel reads: LoRA and AdaLoRA as `LoraAdapter`, the others as `PeftAdapter`."""
    directory, raw = open_adapter_dir(directory)
    kind = raw.get("peft_type")
    if kind in ("LORA", "ADALORA"):
        return read_adapter(directory)
    path = directory / CONFIG_FILE
    if kind not in KINDS:
        raise AdapterError(f"{path}: field 'peft_type' is {kind!r}; lmkernel reads {', '.join(KINDS)} adapters")
    fields = _fields(raw, kind, path)
    tensors = read_weights(directory)
    arch, labels = read_sidecar(directory / SIDECAR_FILE)
    adapter = PeftAdapter(kind, fields, hf_architecture=arch, id2label=labels, path=directory)
    parts = {"IA3": ("ia3_l",), "BOTTLENECK": ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                                                 "adapter_up.bias")}.get(kind, ())
    where = directory / WEIGHTS_FILE
    for key, t in tensors.items():
        if kind in VIRTUAL:
            if key == "prompt_embeddings":
                adapter.prompt = t
            elif key.startswith(PROMPT_PREFIX):
                adapter.saved[key[len(PROMPT_PREFIX):].removeprefix("model.")] = t
            else:
                raise AdapterError(f"{where}: tensor '{key}' is neither 'prompt_embeddings' nor a saved module")
            continue
        if not key.startswith(PREFIX):
            raise AdapterError(f"{where}: tensor '{key}' does not start with '{PREFIX}' as peft's keys do")
        name = key[len(PREFIX):]
        part = next((p for p in parts if name.endswith(f".{p}")), None)
        if part is None:
            adapter.saved[name] = t
        else:
            adapter.modules.setdefault(name[: -len(part) - 1], {})[part] = t
    _check(adapter, where)
    return adapter


def _fields(raw: Mapping[str, Any], kind: str, path: Path) -> PeftFields:
    def bad(key: str, expected: str) -> AdapterError:
        return AdapterError(f"{path}: field '{key}' is {raw.get(key)!r}; expected {expected}")

    saved = raw.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise bad("modules_to_save", "null or a list of module names")
    base = raw.get("base_model_name_or_path")
    common = {"task_type": raw.get("task_type"), "base_model_name_or_path": str(base) if base else None,
              "modules_to_save": tuple(dict.fromkeys(saved))}
    if kind in VIRTUAL:
        n = raw.get("num_virtual_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad("num_virtual_tokens", "a positive integer")
        if raw.get("num_transformer_submodules", 1) not in (1, None):
            raise bad("num_transformer_submodules", "1 (a decoder-only or encoder-only model)")
        if kind == "PREFIX_TUNING" and raw.get("prefix_projection"):
            raise bad("prefix_projection", "false (save the projected prefix: peft does with inference_mode)")
        return PeftFields(**common, num_virtual_tokens=n)
    targets = names_or_regex(raw, "target_modules", path, required=True)
    if kind == "IA3":
        if raw.get("fan_in_fan_out"):
            raise bad("fan_in_fan_out", "false (GPT-2's Conv1D layers are not supported for IA3)")
        ff = names_or_regex(raw, "feedforward_modules", path, required=False) or ()
        return PeftFields(**common, target_modules=targets, feedforward_modules=ff)
    if raw.get("format") != BOTTLENECK_FORMAT:
        raise bad("format", f"'{BOTTLENECK_FORMAT}'")
    size = raw.get("adapter_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise bad("adapter_size", "a positive integer")
    act = raw.get("activation", "gelu")
    if act not in ("gelu", "relu", "silu"):
        raise bad("activation", "gelu, relu or silu")
    return PeftFields(**common, target_modules=targets, adapter_size=size, activation=act)


def _check(adapter: PeftAdapter, where: Path) -> None:
    """Shapes and completeness, so a damaged file fails here and not inside a forward."""
    c = adapter.config
    if adapter.kind in VIRTUAL:
        p = adapter.prompt
        if p is None or p.dim() != 2 or p.shape[0] != c.num_virtual_tokens:
            raise AdapterError(f"{where}: 'prompt_embeddings' is {None if p is None else tuple(p.shape)}; expected "
                               f"[{c.num_virtual_tokens}, hidden] (num_virtual_tokens of {CONFIG_FILE})")
        return
    if not adapter.modules:
        raise AdapterError(f"{where}: no {adapter.kind} tensors")
    for module, parts in adapter.modules.items():
        if not c.targets(module):
            raise AdapterError(f"{where}: tensors for module '{module}', which field 'target_modules' "
                               f"({c.target_modules!r}) of {CONFIG_FILE} does not target")
        if adapter.kind == "IA3":
            t = parts["ia3_l"]
            if t.dim() != 2 or (t.shape[0] != 1 if c.feedforward(module) else t.shape[1] != 1):
                want = "[1, in] (a feed-forward module)" if c.feedforward(module) else "[out, 1]"
                raise AdapterError(f"{where}: '{PREFIX}{module}.ia3_l' has shape {tuple(t.shape)}; expected {want}")
            continue
        missing = {"adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"} - set(parts)
        if missing:
            raise AdapterError(f"{where}: '{PREFIX}{module}' lacks {', '.join(sorted(missing))}")
        down, up = parts["adapter_down.weight"], parts["adapter_up.weight"]
        if down.shape[0] != c.adapter_size or tuple(up.shape) != (down.shape[1], c.adapter_size):
            raise AdapterError(f"{where}: '{PREFIX}{module}': adapter_down {tuple(down.shape)} and adapter_up "
                               f"{tuple(up.shape)} are not [size, out] and [out, size] with adapter_size {c.adapter_size}")


def write_peft_adapter(directory: str | Path, adapter: PeftAdapter, overwrite: bool = False,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write an IA3, prompt- or prefix-tuning or bottleneck adapter as `read_any_adapter` (and, but for the
    bottleneck, peft) reads it; `extra` fills in config fields (num_layers, token_dim, ...)."""
    c = adapter.config
    config: dict[str, Any] = {
        "auto_mapping": None, "base_model_name_or_path": c.base_model_name_or_path, "inference_mode": True,
        "modules_to_save": list(c.modules_to_save) or None, "peft_type": adapter.kind,
        "peft_version": PEFT_FORMAT_VERSION, "revision": None, "task_type": c.task_type,
    }
    if adapter.kind in VIRTUAL:
        if adapter.prompt is None:
            raise AdapterError(f"a {adapter.kind} adapter without its virtual-token table cannot be written")
        config.update({"num_virtual_tokens": c.num_virtual_tokens, "token_dim": int(adapter.prompt.shape[1]),
                       "num_transformer_submodules": 1})
        if adapter.kind == "PROMPT_TUNING":
            config.update({"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_kwargs": None,
                           "tokenizer_name_or_path": None})
        else:
            config.update({"prefix_projection": False, "encoder_hidden_size": int(adapter.prompt.shape[1])})
        tensors = {"prompt_embeddings": adapter.prompt, **{f"{PROMPT_PREFIX}{k}": v for k, v in adapter.saved.items()}}
    else:
        listed = lambda v: v if isinstance(v, str) else list(v)  # noqa: E731
        config["target_modules"] = listed(c.target_modules)
        if adapter.kind == "IA3":
            config.update({"exclude_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True,
                           "feedforward_modules": listed(c.feedforward_modules)})
        else:
            config.update({"format": BOTTLENECK_FORMAT, "adapter_size": c.adapter_size, "activation": c.activation})
        tensors = {f"{PREFIX}{k}": v for k, v in adapter.saved.items()}
        for module, parts in adapter.modules.items():
            tensors.update({f"{PREFIX}{module}.{p}": t for p, t in parts.items()})
    config.update(extra or {})
    return write_files(directory, config, tensors, adapter.hf_architecture, adapter.id2label, overwrite)
