"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, whose rank budget is reallocated while it trains.

    y = base(x) + dropout(x) (A * E)^T B^T * alpha / (r0 + 1e-5)     A [r, in], E [r, 1], B [out, r]

E holds the singular values; the rank allocator (`train/adalora.py`) zeroes the triplets (A row, E
entry, B column) of least importance until the total rank meets its target. `r0` (PEFT's `ranknum`)
stays the initial rank, so masking a triplet does not rescale the others. As a plain LoRA update the
adapter is (A * E) and B with that scaling (`lora_factors`), so serving and merging treat it as LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkernel.layers.lora import merged_dense
from lmkernel.layers.linear import AdapterWrapper, Dense

RANKNUM_EPS = 1e-5  # PEFT's: the update is divided by (ranknum + 1e-5)


def adalora_scaling(alpha: float, init_r: int) -> float:
    """The factor that multiplies (A * E) and B: alpha (or r0 when alpha is 0) over r0, as PEFT computes it."""
    return (alpha if alpha > 0 else float(init_r)) / (init_r + RANKNUM_EPS)


class AdaLoraLinear(AdapterWrapper):
    """A frozen linear layer plus trainable SVD-form factors; A and B start small and random, E at zero."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base_layer)
        if r < 1:
            raise ValueError(f"AdaLoRA initial rank must be at least 1; got {r}")
        w = base_layer.weight
        self.r, self.alpha, self.scaling = r, alpha, adalora_scaling(alpha, r)
        self.lora_A = nn.Parameter((torch.randn(r, base_layer.in_features, generator=generator) * 0.02).to(w.device, w.dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter((torch.randn(base_layer.out_features, r, generator=generator) * 0.02).to(w.device, w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._adopt_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (self.dropout(x) @ (self.lora_A * self.lora_E).T) @ self.lora_B.T * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A * E, B, scaling): the same update as a plain LoRA adapter."""
        return (self.lora_A * self.lora_E).detach(), self.lora_B.detach(), self.scaling

    def merged(self) -> Dense:
        a, b, scaling = self.lora_factors()
        return merged_dense(self.base_layer, a, b, scaling)
