"""Activation checkpointing: in training, a layer keeps only its input and recomputes the rest of
its forward during the backward pass (a third more compute, a small fraction of the memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, checkpointed: bool, *args: Any) -> torch.Tensor:
    """`layer(*args)`; through activation checkpointing when `checkpointed` and training with
    gradients. The recomputation replays the same random dropout masks."""
    if checkpointed and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
