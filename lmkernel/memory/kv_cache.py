"""Per-layer K and V tensors of fixed-size blocks, sized from a memory budget.

The one module of `memory/` that touches torch: it owns the tensors the block pool's ids index into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmkernel.config import CacheConfig, ModelConfig

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """'2GiB', '512MB', '1.5G' or a number of bytes, as an int."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be positive; got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"kv_cache_memory must look like '2GiB', '512MB' or a byte count; got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


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
