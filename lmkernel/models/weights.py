"""Loading Hugging Face-named tensors into a model built on the meta device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lmkernel.errors import WeightsError


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
    """`load_named_tensors`, where a tied output layer `head` shares the `embedding` matrix.

    Checkpoints of tied models often omit the head; it is filled from the embedding, then the two
    parameters are made one.
    """
    named = dict(tensors)
    if tied and embedding in named:
        named.setdefault(head, named[embedding])
    load_named_tensors(model, named, source)
    if tied:
        model.get_submodule(head.rsplit(".", 1)[0]).weight = model.get_submodule(embedding.rsplit(".", 1)[0]).weight
