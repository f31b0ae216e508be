"""The paged KV cache: byte budgets as users write them, blocks sized from the model, and clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkernel.config import CacheConfig, ModelConfig, parse_bytes
from lmkernel.memory.kv_cache import KVGroups, allocate_kv_cache, bytes_per_block, kv_groups

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


GEMMA3_270M_SHAPE = dataclasses.replace(
    QWEN_05B_SHAPE, architecture="gemma3", num_layers=18, num_kv_heads=1, head_dim=256, sliding_window=512,
    layer_types=tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)))


def test_gemma3_layers_form_one_global_group_and_five_sliding_ones_of_three() -> None:
    groups = kv_groups(GEMMA3_270M_SHAPE)
    assert groups.layers == ((0, 1, 2), (3, 4, 6), (7, 8, 9), (10, 12, 13), (14, 15, 16), (5, 11, 17))
    assert groups.windows == (512, 512, 512, 512, 512, None)
    assert [groups.place(i) for i in (0, 6, 11, 16)] == [(0, 0), (1, 2), (5, 1), (4, 2)]
    # A block holds one group's three layers: the pool's blocks are a sixth of the size of a whole-model block.
    assert bytes_per_block(GEMMA3_270M_SHAPE, 16, torch.float32, groups) * 6 == bytes_per_block(GEMMA3_270M_SHAPE, 16, torch.float32)
    cache = allocate_kv_cache(GEMMA3_270M_SHAPE, CacheConfig(memory_bytes=4 << 20), torch.float32, torch.device("cpu"))
    assert len(cache.keys) == 3 and cache.num_layers == 18
    assert cache.layer(5)[0] is cache.layer(0)[0] is cache.keys[0]  # slot 0 of every group shares tensor 0
    assert cache.block_bytes == bytes_per_block(GEMMA3_270M_SHAPE, 16, torch.float32, groups)


def test_without_hybrid_groups_or_windows_every_layer_is_one_group() -> None:
    assert kv_groups(GEMMA3_270M_SHAPE, hybrid=False) == KVGroups((tuple(range(18)),), (None,))
    assert kv_groups(QWEN_05B_SHAPE) == KVGroups((tuple(range(24)),), (None,))
    mistral = dataclasses.replace(QWEN_05B_SHAPE, sliding_window=4096)  # every layer slides
    assert kv_groups(mistral) == KVGroups((tuple(range(24)),), (4096,))
    uneven = dataclasses.replace(QWEN_05B_SHAPE, num_layers=6, sliding_window=64,
                                 layer_types=("sliding_attention",) * 4 + ("full_attention",) * 2)
    assert kv_groups(uneven).layers == ((0, 1), (2, 3), (4, 5))
