"""Per-layer K and V tensors of fixed-size blocks, sized from a memory budget.

The one module of `memory/` that touches torch: it owns the tensors the block pool's ids index into.
"""

from __future__ import annotations

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


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


@dataclass
class KVCache:
    """K and V per layer, each [num_blocks * block_size, kv_heads, head_dim]: one row per token slot."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_blocks: int
    block_size: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]


def allocate_kv_cache(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> KVCache:
    """Allocate as many blocks as the budget allows (at least one)."""
    budget = cache.memory_bytes if cache.memory_bytes is not None else int(available_memory(device) * cache.memory_fraction)
    per_block = bytes_per_block(model, cache.block_size, dtype)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory of {budget} bytes holds no block; one block of {cache.block_size} tokens needs {per_block} bytes"
        )
    shape = (num_blocks * cache.block_size, model.num_kv_heads, model.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
    return KVCache(keys, values, num_blocks, cache.block_size)
