"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.layers import cpu_kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama family), computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused call, same result; half the time at batch-1 decode
            if cpu_kernels.rms_norm_applies(x, self.weight):  # a decode step: a tenth of that again
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """LayerNorm with weight and bias (GPT-2, BERT)."""
    return nn.LayerNorm(dim, eps=eps)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMS norm: rows scaled by (1 + weight), the checkpoint storing the offset from one; computed in
    float32 and cast back, as the reference does. Takes rows of any leading shape ([N, D], [N, heads, D])."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype == torch.float32 and cpu_kernels.rms_norm_applies(rows.contiguous(), scale):
            return cpu_kernels.rms_norm(rows.contiguous(), scale, self.eps).view(x.shape)
        h = rows.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype).view(x.shape)
