"""Builds the flattened, unpadded batch the models take: sequences laid end to end."""

from __future__ import annotations

import torch

from lmkernel.layers.attention import AttentionMetadata


def flatten(seqs: list[list[int]], causal: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Token ids [N], positions [N] and metadata for `seqs` laid end to end."""
    meta = AttentionMetadata.for_lengths([len(s) for s in seqs], causal=causal)
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.tensor([p for s in seqs for p in range(len(s))])
    return ids, positions, meta


def split(t: torch.Tensor, meta: AttentionMetadata) -> list[torch.Tensor]:
    """Per-sequence slices of a flattened [N, ...] tensor."""
    b = meta.cu_seqlens
    return [t[b[i] : b[i + 1]] for i in range(meta.num_sequences)]

