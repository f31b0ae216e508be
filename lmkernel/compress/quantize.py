"""Weight-only quantization: swap a model's dense layers for int8 or int4 ones, by name.

Int8 is symmetric with one scale per output channel; int4 is asymmetric in groups along the input
dimension; dynamic int8 (for encoders) is int8 weights with each input row quantized per call. Embeddings are never linear layers here, and the LM head is skipped by default (it is
tied to the embedding in most small models, and it dominates the quality loss).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.linear import INT4_GROUP_SIZES, DynamicInt8Linear, Int4Linear, Int8Linear
from lmkernel.layers.quantized import DEFAULT_SKIP, METHODS, QuantizationConfig


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
