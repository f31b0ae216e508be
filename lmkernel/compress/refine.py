"""End-to-end refinement of int4 scales and minimums (codes fixed), distilled from the float model.

GPTQ chooses each layer's codes to keep that layer's own output close on calibration inputs; the
quality a user sees is the whole model's next-token distribution. Here the codes stay as rounded,
and every group's scale and minimum is tuned by gradient descent so the quantized model's
distribution matches the float model's (KL divergence on calibration text): a few thousand
parameters per layer, so it cannot memorise the text, and the stored layout does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.linear import Int4Linear
from lmkernel.loading import LoadedModel

DEFAULT_LR = 1e-4
DEFAULT_BATCH = 4  # calibration windows per step


@dataclass(frozen=True)
class RefineResult:
    """What a refinement did: steps taken and the KL divergence (nats/token) over its first and last
    quarter of steps."""

    steps: int
    first_kl: float
    last_kl: float


class _TrainableInt4(nn.Module):
    """An `Int4Linear`'s codes, with its scales and minimums as float32 parameters."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.layer = layer
        groups = layer.padded // layer.group_size
        self.register_buffer("codes", layer.codes().float().view(layer.out_features, groups, layer.group_size))
        self.scales = nn.Parameter(layer.scales.detach().float().clone())
        self.mins = nn.Parameter(layer.mins.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = self.codes * self.scales[..., None] + self.mins[..., None]
        w = w.reshape(layer.out_features, layer.padded)[:, : layer.in_features]
        return F.linear(x, w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the tuned scales and minimums in the int4 layer (its kernel repacks on next use)."""
        self.layer.scales.copy_(self.scales.to(self.layer.scales.dtype))
        self.layer.mins.copy_(self.mins.to(self.layer.mins.dtype))
        self.layer.weights_changed()


def _batches(sequences: Sequence[list[int]], batch: int, steps: int, seed: int) -> list[list[list[int]]]:
    """`steps` batches of `batch` windows: passes over the windows, each in a seeded shuffled order."""
    out: list[list[list[int]]] = []
    per_pass = max(len(sequences) // batch, 1)
    epoch = 0
    while len(out) < steps:
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for b in range(per_pass):
            out.append([sequences[i] for i in order[b * batch : (b + 1) * batch]])
        epoch += 1
    return out[:steps]


def _refinable_layers(lm: LoadedModel, sequences: Sequence[list[int]], steps: int, batch: int, lr: float) -> list[str]:
    """The names of the int4 layers a refinement of `lm` tunes, once the request is checked to make sense."""
    if steps < 1 or batch < 1 or not lr > 0:
        raise LmkError(f"refinement needs steps >= 1, batch >= 1 and lr > 0; got steps={steps}, batch={batch}, lr={lr}")
    if not sequences:
        raise LmkError("refinement needs calibration text; the calibration set is empty")
    if lm.config.is_encoder:
        raise LmkError("refinement matches next-token distributions; it is for causal language models, not encoders")
    names = [name for name, m in lm.model.named_modules() if isinstance(m, Int4Linear)]
    if not names:
        raise LmkError("refinement tunes int4 layers and this model has none; quantize it to int4 first")
    return names


def _distill_step(lm: LoadedModel, teacher: nn.Module, windows: list[list[int]], optimizer: torch.optim.Optimizer,
                  schedule: torch.optim.lr_scheduler.LambdaLR, step: int) -> float:
    """One optimizer step on the KL divergence of `lm`'s next-token distribution on `windows` from `teacher`'s;
    returns the loss (nats/token)."""
    meta = AttentionMetadata.for_lengths([len(s) for s in windows], causal=True)
    ids = torch.tensor([t for s in windows for t in s], device=lm.device)
    positions = torch.tensor([p for s in windows for p in range(len(s))], device=lm.device)
    with torch.no_grad():
        target = F.log_softmax(teacher.compute_logits(teacher(ids, positions, meta)).float(), dim=-1)
    logp = F.log_softmax(lm.model.compute_logits(lm.model(ids, positions, meta)).float(), dim=-1)
    loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
    if not torch.isfinite(loss):
        raise LmkError(f"refinement diverged at step {step + 1} (KL {float(loss)}); try a lower learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def refine_int4(lm: LoadedModel, teacher: nn.Module, sequences: Sequence[list[int]], steps: int | None = None,
                batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
                log: Callable[[str], None] | None = None) -> RefineResult:
    """Tune the scales and minimums of every `Int4Linear` in `lm` (in place) so its next-token
    distribution on `sequences` matches `teacher`'s (the float model, same architecture).

    `steps` defaults to one pass over the windows; Adam with the learning rate decaying linearly to 0.
    """
    if steps is None:
        steps = max(len(sequences) // batch, 1)
    names = _refinable_layers(lm, sequences, steps, batch, lr)
    frozen = {p: p.requires_grad for p in lm.model.parameters()}
    trainable = {name: _TrainableInt4(lm.model.get_submodule(name)) for name in names}

    def swap(use_trainable: bool) -> None:
        """Put the trainable layers in the model's int4 layers' places, or the int4 layers back."""
        for name, module in trainable.items():
            parent, _, child = name.rpartition(".")
            setattr(lm.model.get_submodule(parent) if parent else lm.model, child, module if use_trainable else module.layer)

    params = [p for m in trainable.values() for p in (m.scales, m.mins)]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    losses: list[float] = []
    was_training = lm.model.training
    for p in frozen:
        p.requires_grad_(False)
    swap(True)
    try:
        lm.model.eval()
        teacher.eval()
        with torch.inference_mode(False), torch.enable_grad():
            for step, windows in enumerate(_batches(sequences, batch, steps, seed)):
                losses.append(_distill_step(lm, teacher, windows, optimizer, schedule, step))
                if log is not None and (step + 1) % 8 == 0:
                    log(f"refine step {step + 1}/{steps}: KL {sum(losses[-8:]) / 8:.4f}")
        for module in trainable.values():
            module.write_back()
    finally:
        swap(False)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        lm.model.train(was_training)
    quarter = max(len(losses) // 4, 1)
    return RefineResult(len(losses), sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter)
