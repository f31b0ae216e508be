"""Encoders as three parts: token embeddings, a stack of layers, and what follows the last layer. The recommender
trains the top layers of any encoder on states the frozen ones computed once; every encoder's forward is the
same three parts run whole."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.checkpoint import run_layer


class LayerStack(Protocol):
    """What an encoder offers to be run in pieces."""

    checkpoint_layers: bool

    @property
    def stack(self) -> nn.ModuleList:
        """Its layers, first to last."""
        ...

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The states [N, hidden] the first layer takes."""
        ...

    def layer_args(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, ...]:
        """What every layer takes after the states (rotations, position biases, the metadata), for this batch."""
        ...

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """What follows the last layer (a final norm, or nothing)."""
        ...


def run_stack(model: LayerStack, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Layers `start` to `stop` (all that follow, by default) on `hidden`; `finish` is the caller's, once."""
    args = model.layer_args(positions, meta, hidden.dtype)
    for layer in model.stack[start:stop]:
        hidden = run_layer(layer, model.checkpoint_layers, hidden, *args)
    return hidden


def encode(model: LayerStack, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
           token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The whole encoder: final hidden states [N, hidden]."""
    return model.finish(run_stack(model, model.embed_tokens(input_ids, positions, token_type_ids), positions, meta))
