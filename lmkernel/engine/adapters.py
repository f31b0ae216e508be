"""LoRA adapters served beside one base model, several in one batch.

Each adapter gets one of a fixed number of slots; adapters can be added to free slots and removed while
serving. The layers any adapter targets are wrapped once in `MultiLoraLinear`, holding every slot's
factors for that layer; layers no adapter targets stay as they were. Which slot each token uses is not
kept here: the model runner turns each request's `SamplingParams.lora` into the step's `LoraRouting`
(through `slot`), which travels with the batch, so a forward without one computes the base exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.layers.lora import MultiLoraLinear, linear_layers
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


@dataclass
class PreparedAdapter:
    """An adapter read and matched to the model's layers, not yet installed (reading is slow; installing
    changes the model, so it happens between engine steps)."""

    name: str
    path: Path
    targets: list[Any]  # loader.adapter targets: layer name, a, b, scaling


class LoraAdapters:
    """Named adapters applied to `model` in place, in `capacity` slots; `slot(name)` is what a token of that
    request uses. Adapters can be added and removed while serving (`prepare`, then `install`; `remove`)."""

    def __init__(self, model: nn.Module, config: ModelConfig, paths: Mapping[str, str | Path],
                 capacity: int | None = None) -> None:
        self.model, self.config = model, config
        self.capacity = max(len(paths), capacity or 0, 1)
        self._slots: dict[str, int] = {}
        self.paths: dict[str, Path] = {}
        self._free = list(range(self.capacity - 1, -1, -1))
        self._wrapped: dict[str, MultiLoraLinear] = {}
        self._used: dict[str, int] = {}  # name -> when a request last named it (least recently used goes first)
        self._clock = 0
        self._loads: dict[str, int] = {}  # name -> which install this is (prefix-cache salt)
        self._installs = 0
        for name, path in paths.items():
            self.install(self.prepare(name, path))

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    @property
    def wrapped(self) -> list[str]:
        return sorted(self._wrapped)

    def prepare(self, name: str, path: str | Path) -> PreparedAdapter:
        """Read and check an adapter against the model (AdapterError naming the file and the mismatch)."""
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise AdapterError(f"adapter name {name!r}: expected a non-empty name without ':' or surrounding spaces")
        lora = read_adapter(Path(path))
        if needs_head(lora, self.config) or lora.saved:
            raise AdapterError(f"{lora.path}: adapter '{name}' changes whole modules ({', '.join(lora.saved) or 'the head'}); "
                               "only LoRA layers can be served per request: merge it (`lmk lora merge`) and serve the result")
        layers = linear_layers(self.model)
        shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
        return PreparedAdapter(name, Path(path), list(match_adapter(lora, shapes, self.config)))

    def install(self, adapter: PreparedAdapter) -> None:
        """Put a prepared adapter in a free slot, wrapping the layers it targets that no adapter did yet."""
        if adapter.name in self._slots:
            raise AdapterError(f"an adapter named '{adapter.name}' is already loaded")
        if not self._free:
            raise AdapterError(f"all {self.capacity} adapter slots are taken; unload one first")
        slot = self._free.pop()
        layers = linear_layers(self.model)
        for t in adapter.targets:
            if t.name not in self._wrapped:
                self._wrapped[t.name] = MultiLoraLinear(layers[t.name], self.capacity)
                self.model.set_submodule(t.name, self._wrapped[t.name])
            self._wrapped[t.name].set_adapter(slot, t.a, t.b, t.scaling)
        self._slots[adapter.name] = slot
        self.paths[adapter.name] = adapter.path
        self._installs += 1
        self._loads[adapter.name] = self._installs
        self.touch(adapter.name)

    def remove(self, name: str) -> None:
        """Empty the adapter's slot (its layers keep their wrappers, which add nothing for an empty slot)."""
        slot = self.slot(name)
        for layer in self._wrapped.values():
            layer.slots[slot] = None
        del self._slots[name], self.paths[name]
        self._used.pop(name, None)
        self._loads.pop(name, None)
        self._free.append(slot)

    def salt(self, name: str) -> str:
        """The prefix-cache salt of requests on this load of the adapter."""
        return f"lora:{name}#{self._loads[name]}"

    def touch(self, name: str) -> None:
        self._clock += 1
        self._used[name] = self._clock

    def least_recently_used(self, exclude: set[str]) -> str | None:
        """The loaded adapter used longest ago among those not in `exclude` (the ones in use)."""
        candidates = [n for n in self._slots if n not in exclude]
        return min(candidates, key=lambda n: self._used.get(n, 0)) if candidates else None

    @property
    def full(self) -> bool:
        return not self._free

    def slot(self, name: str | None) -> int:
        """The adapter slot of a request's `lora` name; -1 for the base model."""
        if name is None:
            return -1
        try:
            return self._slots[name]
        except KeyError:
            served = ", ".join(self.names) or "none"
            raise UnknownAdapterError(f"LoRA adapter '{name}' is not loaded; this engine serves: {served}") from None
