"""LoRA adapters served beside one base model, several in one batch.

Each adapter gets a slot. The layers any adapter targets are wrapped once in `MultiLoraLinear`,
holding every adapter's factors for that layer; layers no adapter targets stay as they were. All
wrappers of the model share one `LoraContext`, owned here: before each forward the model runner
hands it the slot of every token (from each request's `SamplingParams.lora`), and clears it after,
so outside the engine's forward the model computes the base exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.layers.lora import LoraContext, MultiLoraLinear, linear_layers
from lmkernel.loader.adapter import match_adapter, needs_head, read_adapter


class UnknownAdapterError(AdapterError, ValueError):
    """A request for an adapter this engine was not started with."""


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor with `model` (no weight is copied), so
    wrapping its layers leaves the original untouched."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                memo[id(t)] = t
        for value in vars(m).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    memo[id(t)] = t
    return copy.deepcopy(model, memo)


class LoraAdapters:
    """Named adapters applied to `model` in place; `slot(name)` is what a token of that request uses."""

    def __init__(self, model: nn.Module, config: ModelConfig, paths: Mapping[str, str | Path]) -> None:
        self.context = LoraContext()
        self.names = list(paths)
        self.paths = {name: Path(p) for name, p in paths.items()}
        bad = [n for n in self.names if not isinstance(n, str) or not n or ":" in n or n != n.strip()]
        if bad:
            raise AdapterError(f"adapter name {bad[0]!r}: expected a non-empty name without ':' or surrounding spaces")
        layers = linear_layers(model)
        shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
        wrapped: dict[str, MultiLoraLinear] = {}
        for slot, name in enumerate(self.names):
            lora = read_adapter(self.paths[name])
            if needs_head(lora, config) or lora.saved:
                raise AdapterError(f"{lora.path}: adapter '{name}' changes whole modules ({', '.join(lora.saved) or 'the head'}); "
                                   "only LoRA layers can be served per request: merge it (`lmk lora merge`) and serve the result")
            for t in match_adapter(lora, shapes, config):
                if t.name not in wrapped:
                    wrapped[t.name] = MultiLoraLinear(layers[t.name], self.context, len(self.names))
                    model.set_submodule(t.name, wrapped[t.name])
                wrapped[t.name].set_adapter(slot, t.a, t.b, t.scaling)
        self.wrapped = sorted(wrapped)
        self._slots = {name: i for i, name in enumerate(self.names)}

    def slot(self, name: str | None) -> int:
        """The adapter slot of a request's `lora` name; -1 for the base model."""
        if name is None:
            return -1
        try:
            return self._slots[name]
        except KeyError:
            served = ", ".join(self.names) or "none"
            raise UnknownAdapterError(f"LoRA adapter '{name}' is not loaded; this engine serves: {served}") from None

    def routing(self, token_slots: Sequence[int], device: torch.device) -> AbstractContextManager[None]:
        """The context for one forward: rows to slots; nothing to do when every row is base."""
        if all(s < 0 for s in token_slots):
            return nullcontext()
        return self.context.use(token_slots, device)
