"""Per-layer K and V tensors of fixed-size blocks, sized from a memory budget, and the KV groups that share them.

The one module of `memory/` that touches torch: it owns the tensors the block pool's ids index into.

Layers whose attention reaches equally far share block tables: a group. Gemma 3 270M has 15 sliding-window
layers and 3 global ones; a sequence's global layers need every block it has written, its sliding layers only
the blocks of their last `window` tokens. As in vLLM's hybrid allocator, the layers are cut into groups of
equal size (the greatest common divisor of the counts of each kind: 6 groups of 3 there), each group has its
own block table per sequence, and all groups draw their blocks from one pool: block b of the tensor at slot j
holds layer j of whichever group holds block b. A sliding group gives its blocks back once they leave the
window, so a long context costs the global layers' blocks plus a window's worth for each sliding group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmkernel.config import CacheConfig, ModelConfig


def available_memory(device: torch.device) -> int:
    """Bytes free for the cache on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@dataclass(frozen=True)
class KVGroups:
    """Layers that share block tables. `layers[g]`: group g's layers in order (its j-th layer stores its K/V in
    the cache's tensor j); `windows[g]`: how far back the group's attention reads (None: the whole context)."""

    layers: tuple[tuple[int, ...], ...]
    windows: tuple[int | None, ...]

    @property
    def group_size(self) -> int:
        return len(self.layers[0])

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    def place(self, layer: int) -> tuple[int, int]:
        """(group, tensor slot) of a layer."""
        for g, members in enumerate(self.layers):
            if layer in members:
                return g, members.index(layer)
        raise IndexError(f"layer {layer} is in no KV group")


def kv_groups(model: ModelConfig, hybrid: bool = True) -> KVGroups:
    """The model's KV groups: with `hybrid`, one kind of layer (same window) per group; else one group of all
    layers that never gives a block back (each layer keeps every block, as before hybrid groups)."""
    n = model.num_layers
    windows = [model.window(i) for i in range(n)]
    if not hybrid:
        return KVGroups((tuple(range(n)),), (None,))
    kinds: dict[int | None, list[int]] = {}
    for i, w in enumerate(windows):
        kinds.setdefault(w, []).append(i)
    size = math.gcd(*(len(members) for members in kinds.values()))
    layers: list[tuple[int, ...]] = []
    group_windows: list[int | None] = []
    for w, members in sorted(kinds.items(), key=lambda kv: kv[1][0]):
        for start in range(0, len(members), size):
            layers.append(tuple(members[start : start + size]))
            group_windows.append(w)
    return KVGroups(tuple(layers), tuple(group_windows))


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, groups: KVGroups | None = None) -> int:
    """K and V of one block of the pool: every layer's without hybrid groups, one group's layers with them."""
    element = torch.empty((), dtype=dtype).element_size()
    layers = model.num_layers if groups is None else groups.group_size
    return 2 * layers * block_size * model.num_kv_heads * model.head_dim * element


@dataclass
class KVCache:
    """K and V per tensor slot, each [num_blocks * block_size, kv_heads, head_dim]: one row per token slot.
    Layer i reads and writes the tensors of its slot in its group (`groups.place`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_blocks: int
    block_size: int
    groups: KVGroups

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def block_bytes(self) -> int:
        """K and V of one block: one token slot of every tensor, `block_size` times."""
        return 2 * len(self.keys) * self.keys[0][: self.block_size].nbytes

    @property
    def num_layers(self) -> int:
        return sum(len(members) for members in self.groups.layers)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.groups.place(index)[1]
        return self.keys[slot], self.values[slot]


def allocate_kv_cache(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> KVCache:
    """Allocate as many blocks as the budget allows (at least one)."""
    groups = kv_groups(model, cache.hybrid)
    budget = cache.memory_bytes if cache.memory_bytes is not None else int(available_memory(device) * cache.memory_fraction)
    per_block = bytes_per_block(model, cache.block_size, dtype, groups)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory of {budget} bytes holds no block; one block of {cache.block_size} tokens needs {per_block} bytes"
        )
    shape = (num_blocks * cache.block_size, model.num_kv_heads, model.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(groups.group_size)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(groups.group_size)]
    return KVCache(keys, values, num_blocks, cache.block_size, groups)
