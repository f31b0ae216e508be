"""Loading Hugging Face-named tensors into a model built on the meta device, and tied output heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkernel.errors import WeightsError
from lmkernel.models.weights import build_on_meta, embedding, load_named_tensors, load_with_tied_head


class Tiny(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def test_tensors_are_assigned_by_name_and_extra_ones_ignored() -> None:
    model = build_on_meta(Tiny, 3, 2)
    assert model.embed.weight.device.type == "meta"
    emb, head = torch.arange(6.0).view(3, 2), torch.ones(3, 2)
    load_named_tensors(model, {"embed.weight": emb, "head.weight": head, "rotary.cache": torch.zeros(1)}, "ckpt")
    assert torch.equal(model.embed.weight, emb) and torch.equal(model.head.weight, head)


def test_a_missing_or_misshapen_tensor_names_the_source_and_the_tensor() -> None:
    with pytest.raises(WeightsError, match=r"^ckpt: missing tensors head\.weight$"):
        load_named_tensors(build_on_meta(Tiny, 3, 2), {"embed.weight": torch.zeros(3, 2)}, "ckpt")
    with pytest.raises(WeightsError, match=r"ckpt: tensor 'head\.weight' has shape \(2, 3\), expected \(3, 2\)"):
        load_named_tensors(build_on_meta(Tiny, 3, 2), {"embed.weight": torch.zeros(3, 2), "head.weight": torch.zeros(2, 3)}, "ckpt")


def test_more_than_five_missing_tensors_are_counted() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(7)])
    with pytest.raises(WeightsError, match=r"^m: missing tensors 0\.weight, 1\.weight, 2\.weight, 3\.weight, 4\.weight and 2 more$"):
        load_named_tensors(model, {}, "m")


def test_a_tied_head_missing_from_the_checkpoint_shares_the_embedding() -> None:
    model = build_on_meta(Tiny, 3, 2)
    emb = torch.arange(6.0).view(3, 2)
    load_with_tied_head(model, {"embed.weight": emb}, "ckpt", "head", "embed", tied=True)
    assert model.head.weight is model.embed.weight and torch.equal(model.head.weight, emb)
    with pytest.raises(WeightsError, match="missing tensors head.weight"):
        load_with_tied_head(build_on_meta(Tiny, 3, 2), {"embed.weight": emb}, "ckpt", "head", "embed", tied=False)
