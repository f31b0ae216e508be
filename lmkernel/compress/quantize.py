"""Weight-only quantization: swap a model's dense layers for int8 or int4 ones, by name.

Int8 is symmetric with one scale per output channel; int4 is asymmetric in groups along the input
dimension. Embeddings are never linear layers here, and the LM head is skipped by default (it is
tied to the embedding in most small models, and it dominates the quality loss).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear

METHODS = ("int8", "int4")
DEFAULT_SKIP = ("lm_head", "*.decoder", "classifier", "*.pooler.dense")


@dataclass(frozen=True)
class QuantizationConfig:
    """What was quantized and how; written into config.json as `quantization_config`."""

    method: str
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    quantized: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"quant_method": "lmkernel", "method": self.method, "group_size": self.group_size,
                "modules_not_converted": list(self.skip), "quantized_modules": list(self.quantized)}

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> QuantizationConfig:
        if data.get("quant_method") != "lmkernel" or data.get("method") not in METHODS:
            raise LmkError(f"{source}: quantization_config {data} is not one lmkernel wrote "
                           f"(expected quant_method 'lmkernel' and method in {METHODS})")
        return cls(str(data["method"]), data.get("group_size"), tuple(data.get("modules_not_converted", ())),  # type: ignore[arg-type]
                   list(data.get("quantized_modules", [])))  # type: ignore[arg-type]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether a module name matches one of the skip patterns (fnmatch style)."""
    return any(fnmatch.fnmatchcase(name, pattern) or name == pattern for pattern in skip)


def quantize_model(model: nn.Module, method: str, group_size: int | None = 128,
                   skip: Sequence[str] = DEFAULT_SKIP) -> QuantizationConfig:
    """Replace, in place, every `nn.Linear` whose name matches no `skip` pattern; returns what was done."""
    if method not in METHODS:
        raise LmkError(f"--method must be one of {', '.join(METHODS)}; got '{method}'")
    if is_quantized(model):
        raise LmkError("this model is already quantized; quantize the float model instead")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise LmkError(f"--group-size must be one of {INT4_GROUP_SIZES} for int4; got {group_size}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(name, skip)]
    if not targets:
        raise LmkError("no linear layer left to quantize after the skip list")
    with torch.no_grad():
        for name, layer in targets:
            new = Int8Linear.from_float(layer) if method == "int8" else Int4Linear.from_float(layer, group_size or 128)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return QuantizationConfig(method, group_size if method == "int4" else None, tuple(skip), [n for n, _ in targets])


def build_quantized(model: nn.Module, config: QuantizationConfig) -> None:
    """Give a freshly built (meta) model the quantized layers a saved checkpoint holds, before loading it."""
    for name in config.quantized:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LmkError(f"quantization_config names module '{name}', which this architecture does not have") from None
        if not isinstance(layer, nn.Linear):
            raise LmkError(f"quantization_config names module '{name}', which is not a linear layer")
        bias = layer.bias is not None
        new: nn.Module
        if config.method == "int8":
            new = Int8Linear(layer.in_features, layer.out_features, bias, layer.weight.dtype)
        else:
            new = Int4Linear(layer.in_features, layer.out_features, bias, config.group_size or 128, layer.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
