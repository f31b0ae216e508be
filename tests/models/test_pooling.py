"""Pooling a flattened varlen batch against a loop over its sequences, and the sentence-transformers Dense stack."""

from __future__ import annotations

import pytest
import torch

from lmkernel.layers.attention import AttentionMetadata
from lmkernel.models.pooling import SentenceHead, first_token, mean_pool

LENGTHS = [3, 1, 7, 2]


def _batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, 8, generator=g) for n in LENGTHS]
    return torch.cat(seqs).to(dtype), AttentionMetadata.for_lengths(LENGTHS, causal=False), seqs


def test_mean_pool_is_each_sequences_mean() -> None:
    hidden, meta, seqs = _batch()
    got = mean_pool(hidden, meta)
    assert got.shape == (4, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack([s.mean(0) for s in seqs]))
    torch.testing.assert_close(got[1], seqs[1][0])  # a one-token sequence is its token


def test_mean_pool_bfloat16_keeps_the_dtype() -> None:
    hidden, meta, seqs = _batch(torch.bfloat16)
    got = mean_pool(hidden, meta)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), torch.stack([s.bfloat16().float().mean(0) for s in seqs]), rtol=2e-2, atol=2e-2)


def test_mean_pool_is_the_same_batched_or_alone() -> None:
    hidden, meta, seqs = _batch()
    alone = [mean_pool(s, AttentionMetadata.for_lengths([len(s)], causal=False))[0] for s in seqs]
    torch.testing.assert_close(mean_pool(hidden, meta), torch.stack(alone))


def test_mean_pool_gradient_spreads_evenly_over_each_sequence() -> None:
    hidden, meta, _ = _batch()
    hidden.requires_grad_(True)
    mean_pool(hidden, meta).sum().backward()
    expected = torch.cat([torch.full((n, 8), 1.0 / n) for n in LENGTHS])
    torch.testing.assert_close(hidden.grad, expected)


def test_first_token_is_each_sequences_first_row() -> None:
    hidden, meta, seqs = _batch()
    got = first_token(hidden, meta)
    assert torch.equal(got, torch.stack([s[0] for s in seqs]))


def test_last_token_rows_are_the_ends_of_cu_seqlens() -> None:
    """Decoder classifiers pool the last token: row cu_seqlens[i+1] - 1 (models/llama.py), the loop's s[-1]."""
    hidden, meta, seqs = _batch()
    last = hidden[torch.tensor(meta.cu_seqlens[1:]) - 1]
    assert torch.equal(last, torch.stack([s[-1] for s in seqs]))


def test_sentence_head_applies_each_dense_and_its_activation() -> None:
    head = SentenceHead(((8, 12, True, "tanh"), (12, 4, False, "identity")))
    first, second = head.sentence_dense
    assert (first.in_features, first.out_features, first.bias is not None) == (8, 12, True)
    assert (second.in_features, second.out_features, second.bias) == (12, 4, None)
    assert list(dict(head.named_parameters())) == ["sentence_dense.0.weight", "sentence_dense.0.bias",
                                                   "sentence_dense.1.weight"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        got = head(x)
    expected = torch.tanh(x @ first.weight.T + first.bias) @ second.weight.T
    torch.testing.assert_close(got, expected)


def test_an_empty_sentence_head_is_the_identity() -> None:
    x = torch.randn(2, 5)
    assert torch.equal(SentenceHead(())(x), x)


@pytest.mark.parametrize("act", ["identity"])
def test_sentence_head_without_tanh_is_linear(act: str) -> None:
    head = SentenceHead(((4, 4, True, act),))
    x = -5 * torch.ones(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ head.sentence_dense[0].weight.T + head.sentence_dense[0].bias)
