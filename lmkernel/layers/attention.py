"""Attention over a flattened batch of variable-length sequences.

Every model passes its projected queries, keys and values as [num_tokens, heads, head_dim] for all
sequences of the batch laid end to end, plus an `AttentionMetadata` saying where each sequence starts.
No sequence is padded to the longest. This module holds the plain, contiguous reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one flattened batch: sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1]."""

    cu_seqlens: tuple[int, ...]
    causal: bool

    @classmethod
    def for_lengths(cls, lengths: list[int], causal: bool) -> AttentionMetadata:
        """Metadata for sequences of the given lengths laid end to end."""
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + int(n))
        return cls(tuple(offsets), causal)

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention per sequence; q [N, Hq, D], k and v [N, Hkv, D] -> [N, Hq, D].

    Grouped-query attention: each of the Hkv key/value heads serves Hq / Hkv query heads.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads != num_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    out = torch.empty_like(q)
    bounds = meta.cu_seqlens
    for i in range(meta.num_sequences):
        s, e = bounds[i], bounds[i + 1]
        qi, ki, vi = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=meta.causal, scale=scale)
        out[s:e] = oi.squeeze(0).transpose(0, 1)
    return out
