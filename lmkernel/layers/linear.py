"""Linear layers behind one interface; dense today, quantized and LoRA-wrapped variants plug in here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.layers import cpu_kernels


class Dense(nn.Linear):
    """y = x W^T + b with W stored [out, in] as in Hugging Face checkpoints.

    A few rows on CPU (batch-1 decode) go through the streaming kernel: there the cost is reading
    the weights, which PyTorch's matrix-vector product does at a third of the memory bandwidth.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= cpu_kernels.SMALL_LINEAR_MAX_ROWS:
            y = cpu_kernels.small_linear(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


def dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A dense projection layer of the given shape."""
    return Dense(in_features, out_features, bias=bias)
