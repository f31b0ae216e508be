"""The engine's attention backends: how decode steps read the paged cache, one class each, chosen once when
the engine starts (`EngineConfig.decode_backend`; auto: the fastest that applies).

Each backend builds its own decode metadata from the step's block tables, and `attend()` runs what it
built, whatever it is: `TorchBackend` gathers contexts in groups of similar length for PyTorch SDPA (any
device and dtype), `PagedKernelBackend` hands the block tables to the compiled CPU kernel, and
`FusedBackend` also runs whole decode steps as one compiled call of every layer where it covers them.
Prompt chunks read their context the same way under every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from lmkernel.config import EngineConfigError
from lmkernel.layers import cpu_kernels
from lmkernel.layers.attention import AttentionMetadata, DecodeBatch, DecodeGroup, GroupedDecode, KVLayer
from lmkernel.memory.kv_cache import KVCache
from lmkernel.models.interface import CausalLM, FusedDecoder

# How decode steps run, fastest first (EngineConfig.decode_backend).
DECODE_BACKENDS = {
    "fused": "the whole decoder in one compiled CPU call per step (up to 16 sequences; more run paged-kernel)",
    "paged-kernel": "the model's forward, attention through the compiled CPU kernel that follows the block tables",
    "torch": "the model's forward, attention by PyTorch SDPA over contexts gathered in groups of similar length",
}


class AttentionBackend(ABC):
    """How a step's decodes read the cache (`decode` builds what `attend()` runs), and whether a whole step runs
    as one call of the backend's own (`covers`, `forward`)."""

    name: str

    def __init__(self, kv_cache: KVCache, device: torch.device) -> None:
        self.kv_cache, self.device = kv_cache, device

    @abstractmethod
    def decode(self, seqs: list[int], starts: list[int], tables: list[list[int]],
               seq_lens: list[int]) -> DecodeBatch | GroupedDecode:
        """The decode metadata of the step's single-token sequences `seqs`; `starts`, `tables`, `seq_lens`: each
        sequence's first query row, block table and context length."""

    def covers(self, num_tokens: int, meta: AttentionMetadata, adapters: bool) -> bool:
        """Whether `forward` runs this step whole (else the model's own forward runs it)."""
        return False

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_layers: Sequence[KVLayer]) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend runs steps through the model's own forward")


class TorchBackend(AttentionBackend):
    """Decodes gathered in groups of similar context length, one SDPA call a group: runs everywhere."""

    name = "torch"

    def decode(self, seqs: list[int], starts: list[int], tables: list[list[int]], seq_lens: list[int]) -> GroupedDecode:
        return GroupedDecode(tuple(
            self._group(g, [starts[i] for i in g], [tables[i] for i in g], [seq_lens[i] for i in g])
            for g in group_by_length(seqs, seq_lens)
        ))

    def _group(self, seqs: list[int], rows: list[int], tables: list[list[int]], lens: list[int]) -> DecodeGroup:
        bs = self.kv_cache.block_size
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        pos = torch.arange(max(lens))
        slots = (padded[:, pos // bs] * bs + pos % bs).to(self.device)
        mask = None
        if min(lens) != max(lens):
            mask = (pos[None, :] < torch.tensor(lens)[:, None])[:, None, None, :].to(self.device)
        like = self.kv_cache.keys[0]
        scratch = (slots.numel(), *like.shape[1:])
        return DecodeGroup(
            tuple(seqs), torch.tensor(rows, device=self.device), slots, mask,
            torch.empty(scratch, dtype=like.dtype, device=like.device), torch.empty(scratch, dtype=like.dtype, device=like.device),
        )


class PagedKernelBackend(AttentionBackend):
    """Every decode of a step in one call of the compiled CPU kernel that follows the block tables."""

    name = "paged-kernel"

    def decode(self, seqs: list[int], starts: list[int], tables: list[list[int]], seq_lens: list[int]) -> DecodeBatch:
        width = max(len(tables[i]) for i in seqs)
        return DecodeBatch(
            tuple(seqs),
            torch.tensor([starts[i] for i in seqs]),
            torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in seqs], dtype=torch.int64),
            torch.tensor([seq_lens[i] for i in seqs], dtype=torch.int64),
            self.kv_cache.block_size,
        )


class FusedBackend(PagedKernelBackend):
    """The paged kernel's decodes, and decode steps without adapters run as the model's fused decoder: every layer
    in one compiled CPU call. `invariant` (deterministic): each row's result the same bits whatever its batch."""

    name = "fused"

    def __init__(self, kv_cache: KVCache, device: torch.device, fused: FusedDecoder, invariant: bool = False) -> None:
        super().__init__(kv_cache, device)
        self.fused, self.invariant = fused, invariant

    def covers(self, num_tokens: int, meta: AttentionMetadata, adapters: bool) -> bool:
        return not adapters and self.fused.covers(num_tokens, meta, self.invariant)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_layers: Sequence[KVLayer]) -> torch.Tensor:
        return self.fused(ids, positions, meta, kv_layers, invariant=self.invariant)


def choose_backend(model: CausalLM, kv_cache: KVCache, device: torch.device, requested: str = "auto",
                   invariant: bool = False) -> AttentionBackend:
    """The backend for this model and cache: `requested`, or with "auto" the fastest one that applies; one that
    cannot run here is refused with the reason."""
    kernel = cpu_kernels.paged_decode_available(kv_cache.keys[0])
    one_group = kv_cache.groups.num_groups == 1  # the fused step follows one block table for every layer
    fused = model.fused_decode() if kernel and one_group and requested in ("auto", "fused") else None
    if requested == "auto":
        requested = "fused" if fused is not None else "paged-kernel" if kernel else "torch"
    if requested in ("fused", "paged-kernel") and not kernel:
        raise EngineConfigError(f"--decode-backend {requested}: the compiled CPU kernels need the model and its KV "
                                f"cache on CPU in float32 (here {kv_cache.keys[0].device}, "
                                f"{kv_cache.keys[0].dtype}); use auto or torch")
    if requested == "fused" and not one_group:
        raise EngineConfigError("--decode-backend fused: this model's sliding-window and global layers keep separate "
                                "block tables (the hybrid KV cache), which the fused step does not follow; use auto, "
                                "paged-kernel or torch, or --no-hybrid-kv-cache")
    if requested == "fused" and fused is None:
        raise EngineConfigError(f"--decode-backend fused: {type(model).__name__} offers no fused decode step for these "
                                "weights (it needs a Llama-family model in float32 with SiLU and dense, int8, int4 or "
                                "GGUF projections); use auto, paged-kernel or torch")
    if requested == "fused":
        return FusedBackend(kv_cache, device, fused, invariant)
    return PagedKernelBackend(kv_cache, device) if requested == "paged-kernel" else TorchBackend(kv_cache, device)


def group_by_length(seqs: list[int], lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Split sequences into groups whose longest context is at most `slack` times the shortest,
    so that padding to the longest in a group wastes little attention work."""
    groups: list[list[int]] = []
    for i in sorted(seqs, key=lambda i: lengths[i]):
        if groups and lengths[i] <= slack * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
