"""Attention over a flattened batch of variable-length sequences, with or without a paged KV cache.

Every model passes its projected queries, keys and values as [num_tokens, heads, head_dim] for all
sequences of the batch laid end to end, plus an `AttentionMetadata` saying where each sequence
starts. No sequence is padded to the longest. Without a cache (the reference path) each sequence
attends within itself. With one, the new K/V are first written into their slots for every sequence,
then each sequence reads its whole context back through its slots: prefill chunks one by one, and
single-token decodes as the engine's attention backend laid them out, chosen once when it started
(`engine/attention_backends.py`): all at once through the compiled CPU kernel that follows the block
tables (`DecodeBatch`), or in groups of similar length, one SDPA call per group (`GroupedDecode`, for
CUDA and other dtypes; keys masked past each sequence's length).

A layer with a sliding `window` lets each query read only keys less than `window` positions before it
(Mistral, Gemma 3's local layers), or, without the causal mask, less than `window` positions away on
either side (EmbeddingGemma); every path above applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmkernel.layers.cpu_kernels import paged_decode
from lmkernel.layers.lora import LoraRouting


@dataclass(frozen=True)
class DecodeGroup:
    """Single-token sequences of similar context length, read in one call.

    rows: their query rows [B]; slots: the cache rows of their contexts, padded to the longest
    [B, Lmax]; mask: which of those are real [B, 1, 1, Lmax], or None when none is padding.
    keys, values: scratch [B * Lmax, Hkv, D] that every layer gathers into. Reusing them matters:
    a fresh buffer this large comes from mmap, and its page faults cost more than the attention.
    """

    seqs: tuple[int, ...]
    rows: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor:
        """The group's rows of q [N, Hq, D] over their gathered contexts -> [B, Hq, D]."""
        shape = (*self.slots.shape, *k_cache.shape[1:])
        flat = self.slots.view(-1)
        keys = torch.index_select(k_cache, 0, flat, out=self.keys).view(shape).transpose(1, 2)  # [B, Hkv, Lmax, D]
        values = torch.index_select(v_cache, 0, flat, out=self.values).view(shape).transpose(1, 2)
        mask = self.mask
        if window is not None:  # keys within the window of each sequence's last position
            longest = self.slots.shape[1]
            lengths = (mask.sum(-1).view(-1, 1) if mask is not None
                       else torch.full((len(self.seqs), 1), longest, device=q.device))
            recent = (torch.arange(longest, device=q.device)[None, :] >= lengths - window).view(-1, 1, 1, longest)
            mask = recent if mask is None else mask & recent
        o = F.scaled_dot_product_attention(q[self.rows].unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        return o.squeeze(2)


@dataclass(frozen=True)
class GroupedDecode:
    """The torch backend's decodes: groups of similar context length, each gathered and read by SDPA (CUDA,
    other dtypes: wherever the compiled kernel cannot run)."""

    groups: tuple[DecodeGroup, ...]

    @cached_property
    def seqs(self) -> frozenset[int]:
        return frozenset(i for g in self.groups for i in g.seqs)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None,
               window: int | None, out: torch.Tensor) -> torch.Tensor:
        """`out` with each decode row written from its query row of q."""
        for group in self.groups:
            out[group.rows] = group.attend(q, k_cache, v_cache, scale, window)
        return out


@dataclass(frozen=True)
class DecodeBatch:
    """The paged-kernel backend's decodes: all single-token sequences, read by the compiled kernel that follows
    the block tables. rows: their query rows [B]; tables: block tables padded with block 0 [B, max_blocks];
    lens: context lengths [B].
    """

    seqs: tuple[int, ...]
    rows: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    block_size: int

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None,
               window: int | None, out: torch.Tensor) -> torch.Tensor:
        """`out` with each decode row written from its query row of q (a step of decodes only: the kernel's
        output itself, no rows to pick)."""
        scale_value = scale if scale is not None else q.shape[-1] ** -0.5
        if len(self.seqs) == q.shape[0]:
            return paged_decode(q, k_cache, v_cache, self.tables, self.lens, self.block_size, scale_value, window)
        out[self.rows] = paged_decode(q[self.rows], k_cache, v_cache, self.tables, self.lens, self.block_size,
                                      scale_value, window)
        return out


@dataclass(frozen=True)
class PagedLayout:
    """Where a step's tokens live in the paged cache.

    slot_mapping: cache row of each new token [N]. seq_lens: context length of each sequence after
    this step. context_slots: for chunks that read earlier tokens back from the cache, the rows of
    their whole context, in order. decode: the single-token sequences, as the engine's attention
    backend reads them (`DecodeBatch` for the compiled kernel, `GroupedDecode` for SDPA).
    """

    slot_mapping: torch.Tensor
    seq_lens: tuple[int, ...]
    context_slots: dict[int, torch.Tensor]
    decode: DecodeBatch | GroupedDecode | None = None

    @property
    def decode_seqs(self) -> frozenset[int] | tuple[int, ...]:
        """Every single-token sequence (asked by every layer)."""
        return self.decode.seqs if self.decode is not None else ()


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one flattened batch: sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1]; `lora`: which
    served LoRA adapter each token's projections add (None: every token runs the base model)."""

    cu_seqlens: tuple[int, ...]
    causal: bool
    paged: PagedLayout | None = None  # the layout of KV group 0 (the only group without sliding-window groups)
    lora: LoraRouting | None = None
    paged_groups: tuple[PagedLayout, ...] = ()  # with several KV groups, each group's layout (the first is `paged`)

    @classmethod
    def for_lengths(cls, lengths: list[int], causal: bool, paged: PagedLayout | tuple[PagedLayout, ...] | None = None,
                    lora: LoraRouting | None = None) -> AttentionMetadata:
        """Metadata for sequences of the given lengths laid end to end; `paged`: one layout, or one per KV group."""
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + int(n))
        if isinstance(paged, tuple):
            return cls(tuple(offsets), causal, paged[0], lora, paged if len(paged) > 1 else ())
        return cls(tuple(offsets), causal, paged, lora)

    def paged_for(self, group: int) -> PagedLayout | None:
        """The paged layout of the layers of KV group `group`."""
        return self.paged_groups[group] if self.paged_groups else self.paged

    @cached_property
    def padding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch padded to [B, Lmax] (computed once, read by every layer): which cells hold a
        real token, and the flat cell index of each token in order."""
        lengths = torch.tensor(self.cu_seqlens).diff()
        longest = int(lengths.max())
        valid = torch.arange(longest)[None, :] < lengths[:, None]
        return valid, valid.view(-1).nonzero().squeeze(1)

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]


class KVLayer(NamedTuple):
    """A layer's K and V cache tensors [slots, Hkv, D], and the KV group whose block tables index them."""

    keys: torch.Tensor
    values: torch.Tensor
    group: int = 0


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, **kw: object) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] for one sequence -> [Tq, Hq, D]."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        scale=scale, enable_gqa=True, **kw,
    )
    return o.squeeze(0).transpose(0, 1)


def allowed_keys(query_positions: torch.Tensor, num_keys: int, causal: bool, window: int | None) -> torch.Tensor:
    """[Tq, Tk] bool: which of keys 0..Tk-1 each query (at its position) reads: the earlier ones and itself if
    `causal`, all otherwise, and of those only the ones less than `window` positions from it."""
    q = query_positions[:, None]
    k = torch.arange(num_keys, device=query_positions.device)[None, :]
    ok = k <= q if causal else torch.ones(q.shape[0], num_keys, dtype=torch.bool, device=q.device)
    if window is not None:
        ok = ok & ((q - k < window) if causal else ((q - k).abs() < window))
    return ok


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean mask as SDPA takes it, or, with an additive score `bias`, the bias where the mask allows
    and -inf elsewhere."""
    if bias is None or mask is None:
        return mask if bias is None else bias
    return bias.masked_fill(~mask, float("-inf"))


def _padded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float | None, dropout_p: float,
    window: int | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Several whole sequences in one call, padded to the longest: a training batch or a batch of
    sentences to embed (sorted by length, so little padding) pays one kernel instead of one a sequence."""
    valid, cells = (t.to(q.device) for t in meta.padding)
    batch, longest = valid.shape
    mask = valid[:, None, None, :]  # [B, 1, 1, Lmax]: padded keys are never attended to
    if meta.causal or window is not None:
        mask = mask & allowed_keys(torch.arange(longest, device=q.device), longest, meta.causal, window)
    # One scatter in and one gather out, each row to a distinct cell: the backward passes are the
    # same two plain copies (no per-sequence slices, no accumulation into shared rows).
    padded = [t.new_zeros(batch * longest, *t.shape[1:]).index_copy(0, cells, t).view(batch, longest, *t.shape[1:])
              .transpose(1, 2) for t in (q, k, v)]
    if bias is not None:
        mask = _with_bias(mask, bias[None, :, :longest, :longest])
    o = F.scaled_dot_product_attention(*padded, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(batch * longest, *q.shape[1:]).index_select(0, cells)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    kv_cache: KVLayer | None = None,
    dropout_p: float = 0.0,
    window: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; q [N, Hq, D], k and v [N, Hkv, D] -> [N, Hq, D].

    Grouped-query attention: each of the Hkv key/value heads serves Hq / Hkv query heads.
    `dropout_p` drops attention probabilities (training without a cache only); `window`: the layer's
    sliding window (None: the whole context); `bias` [Hq, L, L] (L at least the longest sequence) is added
    to the scores of query i and key j of every sequence (relative positions; without a cache only).
    """
    paged = meta.paged_for(kv_cache.group) if kv_cache is not None else None
    if bias is not None and paged is not None:
        raise ValueError("an attention bias is for whole sequences without a cache (encoders)")
    if paged is None and (meta.num_sequences > 1 or bias is not None):
        return _padded_sdpa(q, k, v, meta, scale, dropout_p, window, bias)
    out = torch.empty_like(q)
    if paged is None:
        return _whole_sequences(q, k, v, meta, scale, dropout_p, window, out)
    kv_cache.keys.index_copy_(0, paged.slot_mapping, k)
    kv_cache.values.index_copy_(0, paged.slot_mapping, v)
    decode = paged.decode_seqs
    for i in range(meta.num_sequences if len(decode) < meta.num_sequences else 0):
        if i in decode:
            continue
        s, e = meta.cu_seqlens[i], meta.cu_seqlens[i + 1]
        slots = paged.context_slots.get(i)
        if slots is None:  # the whole context is in this step
            out[s:e] = _one_sequence(q[s:e], k[s:e], v[s:e], scale, meta.causal, dropout_p, window)
            continue
        context, new = slots.shape[0], e - s
        first = 0 if window is None else max(0, context - new - window + 1)  # no query of the chunk reads keys before it
        allowed = allowed_keys(torch.arange(context - new, context, device=q.device), context, True, window)[:, first:]
        out[s:e] = _sdpa(q[s:e], kv_cache.keys[slots[first:]], kv_cache.values[slots[first:]], scale, attn_mask=allowed)
    if paged.decode is not None:
        return paged.decode.attend(q, kv_cache.keys, kv_cache.values, scale, window, out)
    return out


def _one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
                  dropout_p: float, window: int | None) -> torch.Tensor:
    """One sequence whose whole context is q/k/v, causal or not, within its window."""
    if window is None:
        return _sdpa(q, k, v, scale, is_causal=causal, dropout_p=dropout_p)
    allowed = allowed_keys(torch.arange(q.shape[0], device=q.device), q.shape[0], causal, window)
    return _sdpa(q, k, v, scale, attn_mask=allowed, dropout_p=dropout_p)


def _whole_sequences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float | None,
                     dropout_p: float, window: int | None, out: torch.Tensor) -> torch.Tensor:
    """Without a cache: each sequence attends within itself."""
    for i in range(meta.num_sequences):
        s, e = meta.cu_seqlens[i], meta.cu_seqlens[i + 1]
        out[s:e] = _one_sequence(q[s:e], k[s:e], v[s:e], scale, meta.causal, dropout_p, window)
    return out
