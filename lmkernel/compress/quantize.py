"""Weight-only quantization: swap a model's dense layers for int8 or int4 ones, by name.

Int8 is symmetric with one scale per output channel; int4 is asymmetric in groups along the input
dimension; dynamic int8 (for encoders) is int8 weights with each input row quantized per call. Embeddings are never linear layers here, and the LM head is skipped by default (it is
tied to the embedding in most small models, and it dominates the quality loss).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.linear import INT4_GROUP_SIZES, DynamicInt8Linear, Int4Linear, Int8Linear

METHODS = ("int8", "int4", "int8-dynamic")
DEFAULT_SKIP = ("lm_head", "*.decoder", "classifier", "*.pooler.dense")


@dataclass(frozen=True)
class QuantizationConfig:
    """What was quantized and how; written into config.json as `quantization_config`."""

    method: str
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    quantized: list[str] = field(default_factory=list)
    rounding: str = "nearest"  # or "gptq"; informational, the stored layout is the same
    refine_steps: int = 0  # int4: steps of end-to-end scale/minimum refinement (compress/refine.py)

    def to_json(self) -> dict[str, object]:
        return {"quant_method": "lmkernel", "method": self.method, "group_size": self.group_size,
                "rounding": self.rounding, "refine_steps": self.refine_steps,
                "modules_not_converted": list(self.skip), "quantized_modules": list(self.quantized)}

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> QuantizationConfig:
        if data.get("quant_method") != "lmkernel" or data.get("method") not in METHODS:
            raise LmkError(f"{source}: quantization_config {data} is not one lmkernel wrote "
                           f"(expected quant_method 'lmkernel' and method in {METHODS})")
        steps = data.get("refine_steps", 0)
        if not isinstance(steps, int) or steps < 0:
            raise LmkError(f"{source}: quantization_config.refine_steps must be a whole number >= 0; got {steps!r}")
        return cls(str(data["method"]), data.get("group_size"), tuple(data.get("modules_not_converted", ())),  # type: ignore[arg-type]
                   list(data.get("quantized_modules", [])), str(data.get("rounding", "nearest")), steps)  # type: ignore[arg-type]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether a module name matches one of the skip patterns (fnmatch style)."""
    return any(fnmatch.fnmatchcase(name, pattern) or name == pattern for pattern in skip)


def round_embeddings(model: nn.Module) -> None:
    """Round every float32 embedding table to bfloat16 values, in place (see `storage_dtypes`)."""
    with torch.no_grad():
        for name in storage_dtypes(model):
            weight = model.get_submodule(name.rpartition(".")[0]).weight
            weight.copy_(weight.to(torch.bfloat16).float())


def storage_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Tensors a quantized checkpoint stores in bfloat16: its float32 embedding tables.

    The embedding (and the head tied to it) is the largest float tensor left after quantization:
    SmolLM2's is 113 MB in float32, more than its 4-bit linear layers together. Quantizing rounds
    it to bfloat16 values (`round_embeddings`), so storing it that way halves it and a reload still
    gives identical logits.
    """
    return {f"{name}.weight": torch.bfloat16 for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and module.weight.dtype == torch.float32}


def check_method(method: str, group_size: int | None) -> None:
    """Refuse an unknown method or a group size int4 has no layout for (before any model is loaded)."""
    if method not in METHODS:
        raise LmkError(f"--method must be one of {', '.join(METHODS)}; got '{method}'")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise LmkError(f"--group-size must be one of {INT4_GROUP_SIZES} for int4; got {group_size}")


def check_request(model: nn.Module, method: str, group_size: int | None) -> None:
    """`check_method`, and refuse a model that is quantized already."""
    check_method(method, group_size)
    if is_quantized(model):
        raise LmkError("this model is already quantized; quantize the float model instead")


def quantize_model(model: nn.Module, method: str, group_size: int | None = 128,
                   skip: Sequence[str] = DEFAULT_SKIP) -> QuantizationConfig:
    """Replace, in place, every `nn.Linear` whose name matches no `skip` pattern; returns what was done."""
    check_request(model, method, group_size)
    round_embeddings(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(name, skip)]
    if not targets:
        raise LmkError("no linear layer left to quantize after the skip list")
    with torch.no_grad():
        for name, layer in targets:
            new: nn.Module
            if method == "int4":
                new = Int4Linear.from_float(layer, group_size or 128)
            else:
                new = (DynamicInt8Linear if method == "int8-dynamic" else Int8Linear).from_float(layer)
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
        if config.method in ("int8", "int8-dynamic"):
            kind = DynamicInt8Linear if config.method == "int8-dynamic" else Int8Linear
            group = config.group_size if config.method == "int8" else None  # int8 groups: GGUF Q8_0 kept
            new = kind(layer.in_features, layer.out_features, bias, layer.weight.dtype, group)
        else:
            new = Int4Linear(layer.in_features, layer.out_features, bias, config.group_size or 128, layer.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
