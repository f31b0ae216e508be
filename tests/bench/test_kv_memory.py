"""lmkernel.bench.kv_memory: KV bytes one sequence holds (peak and while decoding), measured and from the model's shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_gguf import write_llama_gguf

from lmkernel import load_model
from lmkernel.bench.kv_memory import full_attention_bytes, measure

# tiny_llama: 2 layers, 2 KV heads of 64; float32 K and V of one token = 2 * 2 * 2 * 64 * 4 bytes.
TINY_TOKEN_BYTES = 2048
TINY_BLOCK_BYTES = 16 * TINY_TOKEN_BYTES


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return load_model(write_llama_gguf(tmp_path_factory.mktemp("kv") / "tiny.gguf", tiny_llama), quantization=None)


def test_the_full_attention_figure_is_k_and_v_of_every_layer_in_whole_blocks() -> None:
    smollm2 = SimpleNamespace(config=SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64), dtype=torch.float32)
    assert full_attention_bytes(smollm2, 0, 16) == 0
    assert full_attention_bytes(smollm2, 1, 16) == full_attention_bytes(smollm2, 16, 16) == 737_280
    assert full_attention_bytes(smollm2, 17, 16) == full_attention_bytes(smollm2, 17, 32) == 1_474_560
    assert full_attention_bytes(smollm2, 100, 8) == 13 * 8 * 46_080
    assert full_attention_bytes(SimpleNamespace(config=smollm2.config, dtype=torch.bfloat16), 17, 16) == 737_280


@pytest.mark.parametrize(("context", "decode_blocks"), [(14, 1), (15, 2)])
def test_a_full_attention_model_holds_the_same_blocks_in_both_caches(tiny, context: int, decode_blocks: int) -> None:
    """4 new tokens: the last step computes token context + 3 (2 blocks: the peak), the step before it token
    context + 2 (1 block up to 16 tokens, else 2): what the sequence holds while it decodes."""
    assert (tiny.config.num_layers, tiny.config.num_kv_heads, tiny.config.head_dim, tiny.dtype) == (2, 2, 64, torch.float32)
    prompt = [(7 * i) % 250 + 3 for i in range(context)]
    row = measure(tiny, [prompt], new_tokens=4, kv_cache_memory=8 * TINY_BLOCK_BYTES, max_num_batched_tokens=64)[0]
    assert row.context == context
    for run in (row.hybrid, row.full):
        assert run.decode_bytes == decode_blocks * TINY_BLOCK_BYTES
        assert run.peak_bytes == 2 * TINY_BLOCK_BYTES
        assert run.seconds > 0
    assert row.full_from_shape == row.full.decode_bytes and row.ratio == 1.0
    assert row.hybrid.token_ids == row.full.token_ids and len(row.full.token_ids) == 4
    with torch.inference_mode():  # the plain forward, no paged cache: each new token is the argmax after the ones before
        logits = tiny.logits(prompt + list(row.full.token_ids[:-1]))
    assert tuple(logits[context - 1 :].argmax(-1).tolist()) == row.full.token_ids
