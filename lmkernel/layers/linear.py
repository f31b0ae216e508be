"""Linear layers behind one interface; dense today, quantized and LoRA-wrapped variants plug in here."""

from __future__ import annotations

from torch import nn


def dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A plain dense projection y = x W^T + b with W stored [out, in] as in Hugging Face checkpoints."""
    return nn.Linear(in_features, out_features, bias=bias)
