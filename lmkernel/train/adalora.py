"""AdaLoRA's rank allocator (Zhang et al. 2023): after each optimizer step, score every triplet (A row,
E entry, B column) by its smoothed sensitivity times its uncertainty, and keep the best ones within a
budget that falls on a cubic schedule from the initial total rank to the target.

    I(w)   = |w * dL/dw|                        sensitivity of one weight
    Ibar   = b1 Ibar + (1 - b1) I               smoothed
    Ubar   = b2 Ubar + (1 - b2) |I - Ibar|      uncertainty
    S_i    = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji),   s = Ibar * Ubar
    budget = target + (initial - target) (1 - (t - t_init) / (T - t_final - t_init))^3

The layers' E entries below the budget's threshold are set to zero (the layer keeps its shape, as PEFT's
does); after T - t_final the final pattern is held fixed. An orthogonality penalty keeps A's rows and
B's columns near orthonormal, so E acts as singular values.
"""

from __future__ import annotations

import torch

from lmkernel.layers.adalora import AdaLoraLinear


class RankAllocator:
    """Masks AdaLoRA triplets to a shrinking rank budget; `pattern` is the kept triplets per layer."""

    def __init__(self, layers: dict[str, AdaLoraLinear], target_r: int, total_steps: int, tinit: int, tfinal: int,
                 every: int = 10, beta1: float = 0.85, beta2: float = 0.85, orth_weight: float = 0.5) -> None:
        self.layers, self.total, self.tinit, self.tfinal, self.every = layers, total_steps, tinit, tfinal, every
        self.beta1, self.beta2, self.orth_weight = beta1, beta2, orth_weight
        self.init_budget = sum(m.r for m in layers.values())
        self.target_budget = target_r * len(layers)
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.pattern: dict[str, torch.Tensor] = {n: torch.ones(m.r, dtype=torch.bool) for n, m in layers.items()}

    def budget(self, step: int) -> tuple[int, bool]:
        """The rank budget at `step` and whether to mask at it."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total - self.tfinal:
            return self.target_budget, True
        span = max(self.total - self.tfinal - self.tinit, 1)
        left = 1 - (step - self.tinit) / span
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % self.every == 0

    def orthogonality(self) -> torch.Tensor:
        """The weighted mean of ||A A^T - I||_F and ||B^T B - I||_F over the layers (added to the loss)."""
        terms = []
        for m in self.layers.values():
            for p in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                terms.append(torch.linalg.matrix_norm(p - torch.eye(p.shape[0], device=p.device, dtype=p.dtype)))
        return self.orth_weight * torch.stack(terms).mean()

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            i = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            key = id(p)
            if key not in self.ipt:
                self.ipt[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            self.ipt[key].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
            self.unc[key].mul_(self.beta2).add_((i - self.ipt[key]).abs(), alpha=1 - self.beta2)
            return self.ipt[key] * self.unc[key]

    def step(self, step: int) -> None:
        """Call after the optimizer's step and before its gradients are cleared."""
        if step > self.total - self.tfinal:
            self._apply()
            return
        scores = {n: self._score(m.lora_E).view(-1) + self._score(m.lora_A).mean(1) + self._score(m.lora_B).mean(0)
                  for n, m in self.layers.items()}
        budget, mask = self.budget(step)
        if not (mask or step == self.total - self.tfinal):
            return
        everything = torch.cat(list(scores.values()))
        pruned = self.init_budget - budget
        threshold = torch.kthvalue(everything.float().cpu(), pruned).values.item() if pruned > 0 else float("-inf")
        self.pattern = {n: (s.float().cpu() > threshold) for n, s in scores.items()}
        self._apply()

    def _apply(self) -> None:
        with torch.no_grad():
            for n, m in self.layers.items():
                m.lora_E.masked_fill_(~self.pattern[n].to(m.lora_E.device)[:, None], 0.0)
