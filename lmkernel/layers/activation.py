"""Activation functions by the names Hugging Face configs use."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lmkernel.errors import UnsupportedModelError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for a config's `hidden_act`, or a clear error."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"hidden_act '{name}' is not supported; expected one of {sorted(_ACTIVATIONS)}"
        ) from None
