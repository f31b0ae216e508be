"""`LoadedModel`: a model ready to run with its config and tokenizer, on the reference path: one sequence (or a
batch of sentences) through plain attention. The engine is checked against it, and users call it to score text
or embed sentences."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.linear import GGUFEmbedding, GGUFLinear
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.registry import ModelSource


@dataclass
class LoadedModel:
    """A model ready to run: its config, tokenizer, torch module, and where it came from."""

    config: ModelConfig
    tokenizer: Tokenizer
    model: nn.Module
    source: ModelSource
    dtype: torch.dtype
    device: torch.device

    @property
    def num_parameters(self) -> int:
        """Distinct weights (a tied head counts once; a weight kept in GGUF blocks counts its elements)."""
        counts = {id(p): p.numel() for p in self.model.parameters()}
        for m in self.model.modules():
            if isinstance(m, GGUFLinear):
                counts[id(m.blocks)] = m.in_features * m.out_features
            elif isinstance(m, GGUFEmbedding):
                counts[id(m.blocks)] = m.num_embeddings * m.embedding_dim
        return sum(counts.values())

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] of one token sequence (decoders only)."""
        if self.config.is_encoder:
            raise LmkError(f"{self.source.path}: logits() needs a decoder model; this is an encoder (use embed())")
        ids = self._check_ids(token_ids)
        meta = AttentionMetadata.for_lengths([len(ids)], causal=True)
        positions = torch.arange(len(ids), device=self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), positions, meta)
        return self.model.compute_logits(hidden).float()

    @property
    def max_input_tokens(self) -> int:
        """The most tokens one input may have."""
        c = self.config
        return min(c.max_seq_length or c.max_context, c.max_context)

    def length_batches(self, texts: Sequence[str], max_batch_tokens: int) -> Iterator[tuple[list[int], list[list[int]]]]:
        """Tokenized texts (truncated to the model's limit) in batches of similar length.

        Yields (indices into `texts`, their token ids). Sorting by length and packing up to
        `max_batch_tokens` tokens means no compute is spent on padding.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LmkError("expected a list of strings")
        limit = self.max_input_tokens
        encoded = [ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in self.tokenizer.encode_batch(list(texts))]
        return _by_length(encoded, max_batch_tokens)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], max_batch_tokens: int = 8192, prompt_name: str | None = None,
              dimensions: int | None = None) -> torch.Tensor:
        """Pooled (and, if the model says so, normalised) sentence embeddings [N, dim], float32.

        `prompt_name` puts one of the model's named prefixes before each text (EmbeddingGemma's and nomic's
        "query" and "document", ...); `dimensions` keeps the first that many values of each embedding and
        normalises them again (Matryoshka models are trained for this)."""
        if not self.config.is_encoder:
            raise LmkError(f"{self.source.path}: embed() needs an encoder model; this is a decoder (use logits())")
        if prompt_name is not None:
            if prompt_name not in self.config.prompts:
                known = ", ".join(sorted(self.config.prompts)) or "none"
                raise LmkError(f"prompt_name {prompt_name!r} is not one of this model's prompts ({known})")
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise LmkError("expected a list of strings")
            texts = [self.config.prompts[prompt_name] + t for t in texts]
        vectors = self._embed(self.length_batches(texts, max_batch_tokens), len(texts))
        return truncate_embeddings(vectors, dimensions, self.config.matryoshka_layer_norm)

    def embed_token_ids(self, inputs: Sequence[Sequence[int]], max_batch_tokens: int = 8192) -> torch.Tensor:
        """Embeddings of inputs already tokenized; each must fit the model (see `max_input_tokens`)."""
        if not self.config.is_encoder:
            raise LmkError(f"{self.source.path}: embed() needs an encoder model; this is a decoder (use logits())")
        encoded = [self._check_ids(ids) for ids in inputs]
        limit = self.max_input_tokens
        too_long = next((ids for ids in encoded if len(ids) > limit), None)
        if too_long is not None:
            raise LmkError(f"an input of {len(too_long)} tokens exceeds the model's limit of {limit}")
        with torch.inference_mode():
            return self._embed(_by_length(encoded, max_batch_tokens), len(encoded))

    def _embed(self, batches: Iterator[tuple[list[int], list[list[int]]]], count: int) -> torch.Tensor:
        """Pooled embeddings [count, dim] of the batches, each row in its input's place."""
        out: torch.Tensor | None = None
        for order, batch in batches:
            meta = AttentionMetadata.for_lengths([len(b) for b in batch], causal=False)
            ids = torch.tensor([t for b in batch for t in b], device=self.device)
            positions = torch.tensor([p for b in batch for p in range(len(b))], device=self.device)
            pooled = self.model.pool(self.model(ids, positions, meta), meta).float().cpu()
            out = torch.empty(count, pooled.shape[1]) if out is None else out
            out[torch.tensor(order)] = pooled
        return out if out is not None else torch.empty(0, self.config.hidden_size)

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids as ints, refused when empty, outside the vocabulary or longer than the context."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise LmkError("token_ids is empty; expected at least one token id")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise LmkError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) > self.config.max_context:
            raise LmkError(f"{len(ids)} tokens exceed {self.config.context_limit_reason}")
        return ids


def truncate_embeddings(embeddings: torch.Tensor, dimensions: int | None, layer_norm: bool = False) -> torch.Tensor:
    """The first `dimensions` values of each row, L2-normalised again (OpenAI's `dimensions`); all of them for None.
    `layer_norm` standardises each row first, as nomic-embed v1.5 was trained to be cut."""
    if dimensions is None:
        return embeddings
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= embeddings.shape[1]:
        raise LmkError(f"dimensions must be an integer from 1 to the model's {embeddings.shape[1]}; got {dimensions!r}")
    if layer_norm:
        embeddings = torch.nn.functional.layer_norm(embeddings, embeddings.shape[1:])
    return torch.nn.functional.normalize(embeddings[:, :dimensions], p=2, dim=-1)


def _by_length(encoded: list[list[int]], max_batch_tokens: int) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Indices and ids of token sequences, sorted by length and packed up to `max_batch_tokens` a batch."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    start = 0
    while start < len(order):
        end, tokens = start, 0
        while end < len(order) and (end == start or tokens + len(encoded[order[end]]) <= max_batch_tokens):
            tokens += len(encoded[order[end]])
            end += 1
        yield order[start:end], [encoded[i] for i in order[start:end]]
        start = end
