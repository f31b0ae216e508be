"""Unstructured pruning: zero the least important weights of every linear layer but the heads.

Magnitude ranks weights by |W|; Wanda by |W| times the L2 norm of its input channel over calibration
text (Sun et al., 2023), compared within each output row, so every row ends at the target sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkernel.compress.calibrate import input_norms
from lmkernel.compress.quantize import DEFAULT_SKIP, is_quantized, skipped
from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class PruneReport:
    method: str
    sparsity: float
    layers: list[str]
    zeros: int
    weights: int


def prunable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n, DEFAULT_SKIP)]


@torch.no_grad()
def prune_unstructured(lm: LoadedModel, method: str, sparsity: float,
                       calibration: list[list[int]] | None = None) -> PruneReport:
    """Zero `sparsity` of each row of every prunable linear layer, in place."""
    if method not in METHODS:
        raise LmkError(f"--method must be one of {', '.join(METHODS)} (or structured); got '{method}'")
    if not 0.0 <= sparsity < 1.0:
        raise LmkError(f"--sparsity must be in [0, 1); got {sparsity}")
    if is_quantized(lm.model):
        raise LmkError("this model is quantized; prune the float model, then quantize")
    layers = prunable_layers(lm.model)
    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        if not calibration:
            raise LmkError("wanda needs calibration text; the calibration set is empty")
        norms = input_norms(lm, layers, calibration)
    zeros = total = 0
    for name in layers:
        w = lm.model.get_submodule(name).weight
        score = w.abs().float()
        if method == "wanda":
            score = score * norms[name].to(score.device)[None, :]
        k = int(w.shape[1] * sparsity)
        if k > 0:
            drop = torch.topk(score, k, dim=1, largest=False).indices
            w.scatter_(1, drop, 0.0)
        zeros += int((w == 0).sum())
        total += w.numel()
    return PruneReport(method, sparsity, layers, zeros, total)
