"""The paged KV cache: byte budgets as users write them, blocks sized from the model, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from lmkernel.config import CacheConfig, ModelConfig, parse_bytes
from lmkernel.memory.kv_cache import allocate_kv_cache, bytes_per_block

QWEN_05B_SHAPE = ModelConfig("llama", 151936, 896, 4864, 24, 14, 2, 64, 32768)  # 24 layers, 2 KV heads of 64


@pytest.mark.parametrize(("text", "expected"), [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5G", 1_500_000_000),
                                                (" 64 mib ", 64 * 2**20), (4096, 4096)])
def test_budgets_as_users_write_them(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2 GiBs", "-1GB", 0, -5])
def test_bad_budgets_name_what_is_expected(bad) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_bytes(bad)


def test_blocks_are_sized_from_the_model_and_fill_the_budget() -> None:
    per_block = bytes_per_block(QWEN_05B_SHAPE, 16, torch.float32)
    assert per_block == 2 * 24 * 16 * 2 * 64 * 4  # K and V, layers, tokens, KV heads, head dim, float32
    cache = allocate_kv_cache(QWEN_05B_SHAPE, CacheConfig(block_size=16, memory_bytes=10 * per_block + per_block // 2),
                              torch.float32, torch.device("cpu"))
    assert cache.num_blocks == 10 and cache.num_slots == 160 and len(cache.keys) == len(cache.values) == 24
    k, v = cache.layer(3)
    assert k.shape == v.shape == (160, 2, 64) and k.dtype == torch.float32 and not k.any()
    assert bytes_per_block(QWEN_05B_SHAPE, 16, torch.bfloat16) == per_block // 2


def test_a_budget_without_room_for_one_block_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no block; one block of 16 tokens needs"):
        allocate_kv_cache(QWEN_05B_SHAPE, CacheConfig(memory_bytes=1000), torch.float32, torch.device("cpu"))
