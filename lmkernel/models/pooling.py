"""Sentence pooling over a flattened batch: one vector per sequence from its tokens' hidden states."""

from __future__ import annotations

import torch
from torch import nn

from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.linear import dense


def mean_pool(hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The mean of each sequence's rows of `hidden` [N, D] -> [B, D]."""
    lengths = torch.tensor(meta.cu_seqlens, device=hidden.device).diff()
    owner = torch.repeat_interleave(torch.arange(meta.num_sequences, device=hidden.device), lengths)
    sums = torch.zeros(meta.num_sequences, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    return sums.index_add_(0, owner, hidden) / lengths[:, None].to(hidden.dtype)


def first_token(hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each sequence's first row of `hidden` ([CLS] pooling) -> [B, D]."""
    return hidden[torch.tensor(meta.cu_seqlens[:-1], device=hidden.device)]


class SentenceHead(nn.Module):
    """sentence-transformers' Dense modules after pooling (EmbeddingGemma: 768 -> 3072 -> 768), each
    `activation(linear(x))`, named `sentence_dense.{i}` as the loaders give their weights."""

    def __init__(self, layers: tuple[tuple[int, int, bool, str], ...]) -> None:
        super().__init__()
        self.sentence_dense = nn.ModuleList(dense(i, o, bias) for i, o, bias, _ in layers)
        self.activations = [torch.tanh if act == "tanh" else None for *_, act in layers]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.sentence_dense, self.activations):
            pooled = layer(pooled)
            pooled = act(pooled) if act is not None else pooled
        return pooled
