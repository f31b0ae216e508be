"""LoadedModel's helpers: Matryoshka truncation of embeddings and batching texts by length."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LmkError
from lmkernel.loading.loaded_model import _by_length, truncate_embeddings


def test_truncate_embeddings_keeps_the_first_values_renormalised():
    e = torch.tensor([[3.0, 4.0, 12.0], [0.0, 2.0, 5.0]])
    assert truncate_embeddings(e, None) is e
    torch.testing.assert_close(truncate_embeddings(e, 2), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(truncate_embeddings(e, 1), torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(truncate_embeddings(e, 3), e / e.norm(dim=1, keepdim=True))


def test_truncate_embeddings_with_layer_norm_standardises_first():
    e = torch.tensor([[1.0, 2.0, 3.0]])  # standardised: [-1.2247, 0, 1.2247]
    torch.testing.assert_close(truncate_embeddings(e, 2, layer_norm=True), torch.tensor([[-1.0, 0.0]]))


@pytest.mark.parametrize("bad", [0, 4, True, 1.5, "2"])
def test_truncate_embeddings_refuses_bad_dimensions(bad):
    with pytest.raises(LmkError) as err:
        truncate_embeddings(torch.ones(2, 3), bad)
    assert str(err.value) == f"dimensions must be an integer from 1 to the model's 3; got {bad!r}"


def test_by_length_sorts_and_packs_up_to_the_budget():
    encoded = [[1, 2, 3], [1], [1, 2], [1, 2, 3, 4, 5]]
    assert list(_by_length(encoded, 4)) == [([1, 2], [[1], [1, 2]]), ([0], [[1, 2, 3]]), ([3], [[1, 2, 3, 4, 5]])]
    assert list(_by_length(encoded, 100)) == [([1, 2, 0, 3], [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4, 5]])]
    assert list(_by_length([], 8)) == []
