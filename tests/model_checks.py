"""Helpers of the model tests: unpadded batches laid end to end, loading a saved checkpoint through
the loader layers, and nudging parameters that start at 0 or 1."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loader.hf_config import parse_config
from lmkernel.loader.hf_dir import load_tensors
from lmkernel.models import model_class
from lmkernel.models.weights import build_on_meta


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



def load_dir(directory: Path) -> nn.Module:
    """A Hugging Face checkpoint directory through parse_config, build_on_meta and load_weights."""
    config = parse_config(directory)
    model = build_on_meta(model_class(config), config)
    model.load_weights(load_tensors(directory, torch.float32), str(directory))
    return model.eval()


def perturb_vectors(model: nn.Module, scale: float) -> nn.Module:
    """Biases start at 0 and norm weights at 1; move them so a misplaced one changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * scale)
    return model.eval()
