"""`attend` against attention written out from its definition: grouped query heads, causal and not, one
sequence or several padded, without a cache and through the paged one (chunks of a prompt, decode steps
through the compiled kernel and through groups), with and without a sliding window."""

from __future__ import annotations

import pytest
import torch

from lmkernel.layers.attention import AttentionMetadata, KVLayer, attend


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one sequence, each query head reading KV head h // (Hq / Hkv); the
    queries are the last len(q) positions of the len(k) keys. A window masks, by hand, the keys `window` or
    more positions before the query (causal) or away from it (not causal)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).double(), v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    for i in range(q.shape[0]):
        at = k.shape[0] - q.shape[0] + i  # the query's position
        for j in range(k.shape[0]):
            if (causal and j > at) or (window is not None and (at - j >= window or (not causal and j - at >= window))):
                scores[:, i, j] = float("-inf")
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


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[40], [5, 1, 33, 17]])
def test_a_sliding_window_masks_what_lies_outside_it(causal: bool, lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(lengths))
    n, d, window = sum(lengths), 16, 6
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (8, 2, 2))
    meta = AttentionMetadata.for_lengths(lengths, causal)
    out = attend(q, k, v, meta, window=window)
    for s, e in zip(meta.cu_seqlens, meta.cu_seqlens[1:]):
        torch.testing.assert_close(out[s:e], reference(q[s:e], k[s:e], v[s:e], causal, window), atol=1e-5, rtol=1e-4)
    whole = attend(q, k, v, meta)
    assert (out - whole).abs().max() > 1e-2  # the window matters at these lengths


def _paged(lengths_before: list[int], new: list[int], block: int, kernel: bool, g: torch.Generator):
    """A paged layout where sequence i has `lengths_before[i]` cached tokens and brings `new[i]` more,
    its blocks scattered over the cache; single-token sequences go to the compiled kernel or to groups."""
    from lmkernel.layers.attention import DecodeBatch, DecodeGroup, GroupedDecode, PagedLayout

    total = [a + b for a, b in zip(lengths_before, new)]
    blocks = sum(-(-t // block) for t in total)
    order = torch.randperm(blocks, generator=g).tolist()
    tables, slot_of = [], []
    for t in total:
        table = [order.pop() for _ in range(-(-t // block))]
        tables.append(table)
        slot_of.append(torch.tensor(table)[torch.arange(t) // block] * block + torch.arange(t) % block)
    slot_mapping = torch.cat([slots[b:] for slots, b in zip(slot_of, lengths_before)])
    decodes = [i for i, m in enumerate(new) if m == 1 and lengths_before[i] > 0]
    context = {i: slot_of[i] for i in range(len(total)) if i not in decodes and lengths_before[i] > 0}
    starts = torch.tensor([0, *new]).cumsum(0)
    rows = torch.tensor([int(starts[i]) for i in decodes], dtype=torch.long)
    batch, groups = None, ()
    if decodes and kernel:
        width = max(len(tables[i]) for i in decodes)
        batch = DecodeBatch(tuple(decodes), rows, torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in decodes]),
                            torch.tensor([total[i] for i in decodes]), block)
    elif decodes:
        longest = max(total[i] for i in decodes)
        slots = torch.stack([torch.cat([slot_of[i], slot_of[i].new_zeros(longest - total[i])]) for i in decodes])
        mask = (torch.arange(longest)[None, :] < torch.tensor([total[i] for i in decodes])[:, None]).view(len(decodes), 1, 1, -1)
        groups = (DecodeGroup(tuple(decodes), rows, slots, mask, torch.empty(0), torch.empty(0)),)
    return PagedLayout(slot_mapping, tuple(total), context, batch or (GroupedDecode(groups) if groups else None)), blocks, slot_of


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("window", [None, 7, 40])
def test_paged_attention_with_a_window_equals_the_definition(kernel: bool, window: int | None) -> None:
    """Prefill chunks reading earlier tokens back, whole prompts and decode steps in one batch, through the
    cache, against the definition over each sequence's whole context (3x the window and more)."""
    g = torch.Generator().manual_seed(3)
    block, d, heads, kv_heads = 4, 16, 6, 2
    before, new = [30, 0, 50, 21, 9], [9, 12, 1, 1, 1]
    paged, blocks, slot_of = _paged(before, new, block, kernel, g)
    total = [a + b for a, b in zip(before, new)]
    keys = [torch.randn(t, kv_heads, d, generator=g) for t in total]
    values = [torch.randn(t, kv_heads, d, generator=g) for t in total]
    queries = [torch.randn(m, heads, d, generator=g) for m in new]
    k_cache, v_cache = torch.zeros(blocks * block, kv_heads, d), torch.zeros(blocks * block, kv_heads, d)
    for i, b in enumerate(before):
        k_cache[slot_of[i][:b]], v_cache[slot_of[i][:b]] = keys[i][:b], values[i][:b]
    q = torch.cat(queries)
    k = torch.cat([kk[b:] for kk, b in zip(keys, before)])
    v = torch.cat([vv[b:] for vv, b in zip(values, before)])
    meta = AttentionMetadata.for_lengths(new, True, paged)
    out = attend(q, k, v, meta, kv_cache=KVLayer(k_cache, v_cache), window=window)
    for i, (s, e) in enumerate(zip(meta.cu_seqlens, meta.cu_seqlens[1:])):
        expected = reference(queries[i], keys[i], values[i], True, window)
        torch.testing.assert_close(out[s:e], expected, atol=1e-5, rtol=1e-4)
