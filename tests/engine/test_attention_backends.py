"""The attention backends' own decode layouts, built from a step's block tables: the paged kernel's one batch and
the torch backend's groups of similar length (their slots and masks), against the block-table arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lmkernel.engine.attention_backends import PagedKernelBackend, TorchBackend, group_by_length
from lmkernel.layers.attention import DecodeBatch, GroupedDecode

BS = 4
CACHE = SimpleNamespace(block_size=BS, keys=[torch.zeros(64, 2, 8)])
CPU = torch.device("cpu")
# Three sequences of the step: 0 a prompt chunk, 1 and 2 decodes; their starts in the step's rows, tables, lengths.
SEQS, STARTS, TABLES, LENS = [1, 2], [0, 5, 6], [[0], [3, 7], [9, 1, 4]], [5, 6, 11]


def _slot(table: list[int], p: int) -> int:
    return table[p // BS] * BS + p % BS


def test_sequences_group_while_the_longest_is_within_the_slack_of_the_shortest():
    assert group_by_length([0, 1, 2, 3, 4, 5], [10, 12, 13, 40, 49, 51]) == [[0, 1], [2], [3, 4], [5]]
    assert group_by_length([2, 0], [7, 0, 7]) == [[2, 0]]  # equal lengths: one group, in the order given
    assert group_by_length([], []) == []


def test_the_paged_kernel_gets_every_decode_in_one_batch():
    batch = PagedKernelBackend(CACHE, CPU).decode(SEQS, STARTS, TABLES, LENS)
    assert isinstance(batch, DecodeBatch) and batch.seqs == (1, 2) and batch.block_size == BS
    assert batch.rows.tolist() == [5, 6] and batch.lens.tolist() == [6, 11]
    assert batch.tables.tolist() == [[3, 7, 0], [9, 1, 4]]  # padded with block 0 (never read past a length)


def test_the_torch_backend_gathers_each_groups_contexts_by_slot():
    layout = TorchBackend(CACHE, CPU).decode(SEQS, STARTS, TABLES, LENS)
    assert isinstance(layout, GroupedDecode) and layout.seqs == frozenset({1, 2})
    short, long = layout.groups  # 6 and 11 tokens: too far apart for one group
    assert (short.seqs, long.seqs) == ((1,), (2,)) and short.mask is None
    assert short.slots.tolist() == [[_slot(TABLES[1], p) for p in range(6)]]
    assert long.slots.tolist() == [[_slot(TABLES[2], p) for p in range(11)]]
    assert short.rows.tolist() == [5] and long.keys.shape == (11, 2, 8)  # scratch for one gather a layer


def test_a_group_of_different_lengths_masks_the_padding():
    layout = TorchBackend(CACHE, CPU).decode([0, 1], [0, 1], [[2, 5], [6, 3]], [7, 8])
    (group,) = layout.groups
    assert group.mask.view(2, -1).tolist() == [[True] * 7 + [False], [True] * 8]
    assert group.slots[0, :7].tolist() == [_slot([2, 5], p) for p in range(7)]
