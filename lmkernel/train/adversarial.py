"""Adversarial training on the input embeddings (`--adversarial fgm|pgd`): each step also trains on the
batch with its token embeddings pushed, within a radius `epsilon`, in the direction that raises the loss
most, so the model's decision does not hinge on small changes of its input (typos, rare spellings).

    FGM (Miyato et al. 2017):  r = epsilon * g / ||g||, g the gradient of the loss at the embeddings;
                               the step's gradient is that of loss(e) + loss(e + r).
    PGD (Madry et al. 2018):   `steps` ascent steps of size epsilon / steps, each projected back into
                               ||r|| <= epsilon; only the last one's gradient is added.

The perturbation is added to the word-embedding layer's output through a forward hook, one tensor per
micro-batch, so it works the same for full fine-tuning and for adapters (a frozen embedding table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmkernel.errors import LmkError

METHODS = ("fgm", "pgd")


class EmbeddingAttack:
    """Runs a step's backward passes with the word embeddings perturbed, between a model's forward hooks."""

    def __init__(self, model: nn.Module, vocab_size: int, method: str, epsilon: float, steps: int = 3) -> None:
        if method not in METHODS:
            raise LmkError(f"--adversarial must be one of {', '.join(METHODS)}; got '{method}'")
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
        if not tables:
            raise LmkError("--adversarial: the model has no word-embedding table to perturb")
        self.method, self.epsilon, self.steps = method, epsilon, steps if method == "pgd" else 1
        self.deltas: list[torch.Tensor | None] | None = None  # per micro-batch, while a pass runs
        self.index = 0
        self.handle = tables[0].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        if self.deltas is None:
            return None  # evaluation, or a forward outside `step`
        if self.index == len(self.deltas):
            self.deltas.append(None)
        delta = self.deltas[self.index]
        if delta is None:  # a clean pass: a zero leaf whose gradient is the loss's gradient at the embeddings
            delta = self.deltas[self.index] = torch.zeros_like(out, requires_grad=True)
        self.index += 1
        return out + delta.to(out.dtype)

    def _pass(self, deltas: Sequence[torch.Tensor | None], backward: Callable[[], None]) -> list[torch.Tensor | None]:
        self.deltas, self.index = list(deltas), 0
        try:
            backward()
            return self.deltas
        finally:
            self.deltas = None

    def step(self, backward: Callable[[], None], params: Sequence[nn.Parameter]) -> None:
        """Run `backward` (every micro-batch's forward and backward) clean, then perturbed; the parameters'
        gradients end as those of the clean loss plus the adversarial loss."""
        clean = self._pass([], backward)
        grads = [d.grad if d is not None else None for d in clean]
        if self.method == "fgm":
            self._pass([_scaled(g, self.epsilon) for g in grads], backward)
            return
        kept = [p.grad.clone() if p.grad is not None else None for p in params]
        deltas = [torch.zeros_like(g) if g is not None else None for g in grads]
        for t in range(self.steps):
            deltas = [_project(d + _scaled(g, self.epsilon / self.steps), self.epsilon) if d is not None else None
                      for d, g in zip(deltas, grads)]
            if t < self.steps - 1:  # the gradient at the perturbed point gives the next ascent direction
                for p in params:
                    p.grad = None
                leaves = [d.detach().requires_grad_(True) if d is not None else None for d in deltas]
                grads = [d.grad if d is not None else None for d in self._pass(leaves, backward)]
            else:
                for p, g in zip(params, kept):
                    p.grad = g
                self._pass([d.detach() if d is not None else None for d in deltas], backward)

    def close(self) -> None:
        self.handle.remove()


def _scaled(g: torch.Tensor | None, length: float) -> torch.Tensor | None:
    """`g` rescaled to L2 norm `length` (zero where the gradient is zero or not finite)."""
    if g is None:
        return None
    norm = g.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        return torch.zeros_like(g)
    return g * (length / norm)


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norm = delta.float().norm()
    return delta * (radius / norm) if norm > radius else delta
