"""`attend` without a cache (prefill of whole sequences, training, embedding batches) against attention
written out from its definition: grouped query heads, causal and not, one sequence or several padded."""

from __future__ import annotations

import pytest
import torch

from lmkernel.layers.attention import AttentionMetadata, attend


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one sequence, each query head reading KV head h // (Hq / Hkv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).double(), v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (14, 2), (12, 12)])  # SmolLM2, Qwen2.5-0.5B, BERT-like
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[7], [5, 1, 12, 3]])
def test_attend_equals_the_definition(heads: int, kv_heads: int, causal: bool, lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(lengths) + heads)
    n, d = sum(lengths), 16
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    meta = AttentionMetadata.for_lengths(lengths, causal)
    out = attend(q, k, v, meta)
    assert out.shape == (n, heads, d)
    for s, e in zip(meta.cu_seqlens, meta.cu_seqlens[1:]):  # each sequence sees only itself
        torch.testing.assert_close(out[s:e], reference(q[s:e], k[s:e], v[s:e], causal), atol=1e-5, rtol=1e-4)


def test_metadata_lays_sequences_end_to_end() -> None:
    meta = AttentionMetadata.for_lengths([3, 1, 2], causal=True)
    assert meta.cu_seqlens == (0, 3, 4, 6) and meta.num_sequences == 3 and meta.num_tokens == 6
    valid, cells = meta.padding
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert cells.tolist() == [0, 1, 2, 3, 6, 7]
