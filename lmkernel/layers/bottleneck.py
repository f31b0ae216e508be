"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after a frozen projection.

    y = base(x);   y + up(act(down(y)))        down [size, out], up [out, size], up starting at zero

Placed after the attention output and the feed-forward output projections (before their residual sum),
as in the paper. The adapter adds a non-linearity, so it cannot fold into the weights: it is served as
these modules, on every token (no merge step).
"""

from __future__ import annotations

import torch
from torch import nn

from lmkernel.layers.activation import get_activation
from lmkernel.layers.linear import AdapterWrapper, Dense

ACTIVATIONS = ("gelu", "relu", "silu")


class BottleneckLinear(AdapterWrapper):
    """A frozen linear layer followed by a trainable bottleneck adapter of `size` hidden units."""

    def __init__(self, base_layer: nn.Module, size: int, activation: str = "gelu",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base_layer)
        if size < 1:
            raise ValueError(f"adapter size must be at least 1; got {size}")
        self.size, self.activation = size, activation
        ref = next((t for t in base_layer.parameters() if t.is_floating_point()), None)
        device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
        width = base_layer.out_features
        self.adapter_down = Dense(width, size, bias=True, device=device, dtype=dtype)
        self.adapter_up = Dense(size, width, bias=True, device=device, dtype=dtype)
        with torch.no_grad():  # near-identity start: small down projection, zero up projection
            self.adapter_down.weight.copy_(torch.randn(size, width, generator=generator) * 1e-2)
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()
        self.act = get_activation(activation)
        self._adopt_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter_up(self.act(self.adapter_down(y)))
