"""LoRA: a low-rank update beside a frozen linear layer, for one adapter (training) or many (serving).

    y = base(x) + dropout(x) A^T B^T * scaling        A [r, in], B [out, r], scaling = alpha / r

`LoraLinear` holds one trainable adapter and folds into a plain `Dense` (`merged`). `MultiLoraLinear`
holds several adapters for serving; which one each token of a flattened batch uses comes from the
`LoraRouting` the model runner builds for the step and the model passes to each projection (`project`).
A token with no adapter gets the base layer's output, and a batch with no adapter tokens costs one check
per layer. Models loaded without adapters keep their plain layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmkernel.errors import AdapterError
from lmkernel.layers.linear import AdapterWrapper, Dense


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (PEFT's `use_rslora`)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_lora_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh A [r, in], float32 on CPU, drawn as PEFT draws it: Kaiming-uniform with a = sqrt(5)."""
    a = torch.empty(r, in_features)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def merged_dense(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str = "") -> Dense:
    """A new `Dense` with W + scaling * B @ A (the base's bias kept); the base layer is not changed."""
    if not isinstance(base, nn.Linear):
        raise AdapterError(f"cannot merge LoRA into '{name}': it is a {type(base).__name__}, not a float linear layer; "
                           "load the base model unquantized to merge")
    w = base.weight.detach()
    delta = (b.detach().float() @ a.detach().float()) * scaling
    layer = Dense(base.in_features, base.out_features, bias=False, device="meta")
    layer.weight = nn.Parameter((w.float() + delta.to(w.device)).to(w.dtype), requires_grad=False)
    layer.bias = base.bias
    return layer


class LoraLinear(AdapterWrapper):
    """A frozen base linear layer plus one trainable LoRA adapter (`lora_A`, `lora_B`)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, use_rslora: bool = False) -> None:
        super().__init__(base_layer)
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1; got {r}")
        w = base_layer.weight
        self.r, self.alpha, self.scaling = r, alpha, lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(init_lora_a(r, base_layer.in_features, generator).to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._adopt_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged(self) -> Dense:
        """The base layer with this adapter folded into its weight, as a plain `Dense`."""
        return merged_dense(self.base_layer, self.lora_A, self.lora_B, self.scaling)


@dataclass(frozen=True)
class LoraRouting:
    """Which adapter slot the rows of one forward use; the model runner makes one per step and it travels
    with the batch (`AttentionMetadata.lora`, and to `compute_logits`), so no layer keeps routing state.

    `groups` holds, per adapter slot present, its rows: a slice when they are contiguous (one request, or
    a batch of one adapter), else an index tensor. Rows in no group use the base layer alone.
    """

    groups: tuple[tuple[int, slice | torch.Tensor], ...]

    @classmethod
    def of(cls, row_slots: Sequence[int], device: torch.device) -> LoraRouting | None:
        """Routing for rows given their slots (-1: base); None when every row is base."""
        rows: dict[int, list[int]] = {}
        for i, slot in enumerate(row_slots):
            if slot >= 0:
                rows.setdefault(slot, []).append(i)
        if not rows:
            return None
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for slot, idx in rows.items():
            if idx[-1] - idx[0] + 1 == len(idx):
                groups.append((slot, slice(idx[0], idx[-1] + 1)))
            else:
                groups.append((slot, torch.tensor(idx, device=device)))
        return cls(tuple(groups))


def project(layer: nn.Module, x: torch.Tensor, lora: LoraRouting | None) -> torch.Tensor:
    """`layer(x)`, with the adapters' updates for the rows `lora` routes when the layer holds served adapters."""
    if lora is not None and type(layer) is MultiLoraLinear:
        return layer(x, lora)
    return layer(x)


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's factors for one layer, ready to run: A [r, in] and B [out, r] times the scaling."""

    a: torch.Tensor
    b_scaled: torch.Tensor


class MultiLoraLinear(nn.Module):
    """A base layer (dense or quantized) with several adapters in slots; rows pick one through the
    `LoraRouting` of the forward (called without one, it is the base layer).

    For serving only (inference): the adapters' rows are added into the base output in place.
    """

    def __init__(self, base_layer: nn.Module, num_slots: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.slots: list[LoraWeights | None] = [None] * num_slots

    def set_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put an adapter's factors in a slot, in the base layer's device and compute dtype."""
        ref = next((t for t in (*self.base_layer.parameters(), *self.base_layer.buffers()) if t.is_floating_point()), None)
        device = ref.device if ref is not None else a.device
        dtype = ref.dtype if ref is not None else torch.float32
        self.slots[slot] = LoraWeights(a.detach().to(device, dtype).contiguous(),
                                       (b.detach().float() * scaling).to(device, dtype).contiguous())

    def forward(self, x: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        y = self.base_layer(x)
        for slot, rows in lora.groups if lora is not None else ():
            w = self.slots[slot]
            if w is None:
                continue
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ w.a.T, w.b_scaled.T)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ w.a.T) @ w.b_scaled.T)
        return y


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer (dense, quantized or LoRA-wrapped) by name; the base layers inside wrappers not again."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name.endswith("base_layer") and name.rsplit(".", 1)[0] in out:
            continue
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            out[name] = m
    return out
