"""`AsyncEmbedder`: the door for servers to an encoder model, as `AsyncEngine` is to a decoder: sentence
embeddings computed off the event loop, and every input checked once, here, before any work starts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from lmkernel.errors import ContextLengthError, LmkError
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.loading import LoadedModel, truncate_embeddings


class AsyncEmbedder:
    """Embeddings of token-id inputs from one encoder (BERT: mean or CLS pooling, as the model says)."""

    def __init__(self, loaded: LoadedModel) -> None:
        if not loaded.config.is_encoder:
            raise LmkError(f"{loaded.source.path}: embeddings need an encoder model; this is a decoder")
        self.loaded = loaded

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def dimensions(self) -> int:
        c = self.loaded.config
        return c.sentence_dense[-1][1] if c.sentence_dense else c.hidden_size

    @property
    def matryoshka(self) -> bool:
        """Whether the model's embeddings may be cut short (`dimensions`)."""
        return self.loaded.config.matryoshka

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prefixes ("query", "document", ...)."""
        return self.loaded.config.prompts

    @property
    def max_input_tokens(self) -> int:
        """The most tokens one input may have (the length the model was trained to embed)."""
        return self.loaded.max_input_tokens

    def check_inputs(self, inputs: Sequence[Sequence[int]]) -> None:
        """Each input non-empty, in the vocabulary and within `max_input_tokens`; else a ValueError (a
        ContextLengthError for a long one) naming the input by its index."""
        vocab, limit = self.loaded.config.vocab_size, self.max_input_tokens
        for i, ids in enumerate(inputs):
            if not ids:
                raise ValueError(f"input[{i}] is empty")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"input[{i}]: token id {bad} is outside the vocabulary [0, {vocab})")
            if len(ids) > limit:
                raise ContextLengthError(f"input[{i}] has {len(ids)} tokens; this model takes at most {limit}")

    async def embed(self, inputs: Sequence[Sequence[int]], dimensions: int | None = None) -> torch.Tensor:
        """Embeddings [N, dimensions], float32, of inputs that passed `check_inputs`, on a worker thread; cut to
        `dimensions` and normalised again where given."""
        self.check_inputs(inputs)
        vectors = await asyncio.to_thread(self.loaded.embed_token_ids, inputs)
        return truncate_embeddings(vectors, dimensions, self.loaded.config.matryoshka_layer_norm)
