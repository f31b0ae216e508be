"""What every model offers the rest of lmkernel, as `typing.Protocol`s: the engine, the loaders, training
and evaluation rely on these methods and nothing else of a model's class.

All models take one flattened, unpadded batch: token ids and positions [N] for every sequence laid end
to end, and an `AttentionMetadata` saying where each sequence starts (and, in the engine, where its
K/V live in the paged cache and which LoRA adapter each token uses). Prefill and decode are the same
call: a decode step is a batch whose sequences each bring one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata, KVLayer
from lmkernel.layers.lora import LoraRouting


@runtime_checkable
class FusedDecoder(Protocol):
    """A compiled whole-model decode step a model may offer: every layer in one call for the steps it
    `covers` (each of up to `max_sequences` sequences adds one token); the model's own forward runs the
    others. `invariant`: each row's result does not depend on the others (any number of rows, in pieces)."""

    max_sequences: int

    def covers(self, num_tokens: int, meta: AttentionMetadata, invariant: bool = False) -> bool: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: Sequence[KVLayer], invariant: bool = False) -> torch.Tensor: ...


@runtime_checkable
class CausalLM(Protocol):
    """A decoder (Llama family, GPT-2): hidden states for a varlen batch, then next-token scores."""

    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: Sequence[KVLayer] | None = None) -> torch.Tensor:
        """Final hidden states [N, hidden]; with `kv_caches` and paged metadata, through the paged cache."""
        ...

    def compute_logits(self, hidden: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        """Scores [N, vocab] of the given hidden rows."""
        ...

    def fused_decode(self) -> FusedDecoder | None:
        """The decode backend the model offers beyond its own forward, for the model runner to pick once;
        None where none applies (the architecture, the weights' types, the device)."""
        ...


@runtime_checkable
class Encoder(Protocol):
    """A bidirectional encoder (BERT): hidden states, sentence embeddings and, with a head, labels."""

    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One embedding per sequence [B, hidden] (mean or CLS pooling, normalized as configured)."""
        ...

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Label scores per sequence [B, labels] from a sequence-classification head."""
        ...
