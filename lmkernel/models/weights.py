"""Loading Hugging Face-named tensors into a model built on the meta device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lmkernel.errors import WeightsError
from lmkernel.layers.linear import GGUFEmbedding, GGUFLinear


def load_named_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Assign every parameter of `model` from `tensors` (names as in its Hugging Face checkpoint).

    Raises `WeightsError` naming `source` when a tensor is missing or has the wrong shape. Tensors
    that the model has no place for (another head, rotary caches) are ignored.
    """
    expected = model.state_dict(keep_vars=True)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{source}: missing tensors {shown}")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise WeightsError(
                f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(param.shape)} from the model config"
            )
    model.load_state_dict({name: tensors[name] for name in expected}, strict=True, assign=True)


def build_on_meta(cls: type[nn.Module], *args: object) -> nn.Module:
    """Construct a model without allocating its weights; they arrive with `load_named_tensors`."""
    with torch.device("meta"):
        return cls(*args)


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: its values come from the checkpoint. (Random
    initialisation on the meta device imports torch's compiler, 1.5 s of every start.)"""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def load_with_tied_head(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, head: str, embedding: str, tied: bool
) -> None:
    """`load_named_tensors`, where a tied output layer (module `head`) shares the `embedding` matrix.

    Checkpoints of tied models often omit the head; it is filled from the embedding, then the two
    tensors are made one (the `weight`, or the `blocks` of a table kept in GGUF blocks).
    """
    table = model.get_submodule(embedding)
    field = "blocks" if isinstance(table, GGUFEmbedding) else "weight"
    named = dict(tensors)
    if tied and f"{embedding}.{field}" in named:
        named.setdefault(f"{head}.{field}", named[f"{embedding}.{field}"])
    load_named_tensors(model, named, source)
    if tied:
        setattr(model.get_submodule(head), field, getattr(table, field))


def keep_gguf_blocks(model: nn.Module, kept: Mapping[str, int], row_bytes: Mapping[str, int], dtype: torch.dtype,
                     tied_head: str | None = None, embedding: str | None = None) -> None:
    """Swap, by name, the linear layers and embedding tables whose weights stay in GGUF blocks for
    `GGUFLinear` / `GGUFEmbedding` of the stored type (before the blocks are loaded). A `tied_head`
    reading a kept `embedding` becomes a `GGUFLinear` over the same blocks."""
    layers = dict(kept)
    if tied_head is not None and embedding in layers:
        layers[tied_head] = layers[embedding]
        row_bytes = {**row_bytes, tied_head: row_bytes[embedding]}
    for name, gguf_type in layers.items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, nn.Embedding)):
            raise WeightsError(f"module '{name}' holds GGUF blocks but is a {type(old).__name__}")
        with torch.device("meta"):  # shapes only: the blocks arrive with the checkpoint (assigned, not copied)
            new = (GGUFLinear(old.in_features, old.out_features, old.bias is not None, gguf_type, row_bytes[name], dtype)
                   if isinstance(old, nn.Linear) else
                   GGUFEmbedding(old.num_embeddings, old.embedding_dim, gguf_type, row_bytes[name], dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
