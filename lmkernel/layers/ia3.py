"""(IA)3 (Liu et al. 2022): a learned vector rescales a frozen linear layer's outputs, or, for
feed-forward layers, its inputs. PEFT's layout: `ia3_l` is [out, 1] or, feed-forward, [1, in].

    y = base(x) * l          (attention keys and values)
    y = base(x * l)          (feed-forward: the MLP's output projection)

It keeps the layer's shape, so it folds into the weights (`merged`) and is served like the base model.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkernel.errors import AdapterError
from lmkernel.layers.linear import AdapterWrapper, Dense


def ia3_merged(base: nn.Module, scale: torch.Tensor, feedforward: bool, name: str = "") -> Dense:
    """A new `Dense` with the scaling folded in: W * l^T (feed-forward: columns) or l * [W | b] (rows)."""
    if not isinstance(base, nn.Linear):
        raise AdapterError(f"cannot merge (IA)3 into '{name}': it is a {type(base).__name__}, not a float linear layer")
    w = base.weight.detach()
    s = scale.detach().to(w.device, torch.float32).reshape(-1)
    layer = Dense(base.in_features, base.out_features, bias=False, device="meta")
    if feedforward:
        layer.weight = nn.Parameter((w.float() * s[None, :]).to(w.dtype), requires_grad=False)
        layer.bias = base.bias
    else:
        layer.weight = nn.Parameter((w.float() * s[:, None]).to(w.dtype), requires_grad=False)
        layer.bias = None if base.bias is None else nn.Parameter((base.bias.detach().float() * s).to(w.dtype),
                                                                requires_grad=False)
    return layer


class Ia3Linear(AdapterWrapper):
    """A frozen linear layer with a trainable (IA)3 vector, initialised to ones (the identity)."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        w = base_layer.weight
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))
        self._adopt_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.reshape(-1)
        if self.feedforward:
            return self.base_layer(x * scale)
        return self.base_layer(x) * scale

    def merged(self) -> Dense:
        return ia3_merged(self.base_layer, self.ia3_l, self.feedforward)
