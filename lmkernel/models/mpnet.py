"""MPNet encoder (all-mpnet-base-v2): BERT's layers with a learned bias per head on each relative distance.

    h_0    = LayerNorm(word(tokens) + position(2 + positions))           positions count from the padding id + 1
    bias   = relative_attention_bias(bucket(j - i))                       [heads, Tq, Tk], shared by every layer
    a_l    = LayerNorm(h_l + o(softmax(q k^T / sqrt(d) + bias) v))       bidirectional
    h_l+1  = LayerNorm(a_l + output.dense(gelu(intermediate.dense(a_l))))
    sentence = normalise(mean over the tokens of each sequence of h_L)
    labels   = out_proj(tanh(dense(h_L[first token])))                    MPNetForSequenceClassification

Distances fall into 32 buckets, 16 a direction: exact below 8, then logarithmic up to 128 (T5's scheme).
Parameter names follow Hugging Face's MPNetModel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.activation import get_activation
from lmkernel.layers.attention import AttentionMetadata, attend
from lmkernel.layers.linear import dense
from lmkernel.layers.norm import layer_norm
from lmkernel.models.encoder_stack import encode
from lmkernel.models.pooling import first_token, mean_pool
from lmkernel.models.weights import embedding, load_named_tensors

NUM_BUCKETS, MAX_DISTANCE = 32, 128


def relative_buckets(length: int, device: torch.device) -> torch.Tensor:
    """[L, L] bucket of each (query i, key j) pair's distance j - i."""
    distance = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    n, half = -distance, NUM_BUCKETS // 2
    bucket = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)).long()
    return bucket + torch.where(n < exact, n, far.clamp(max=half - 1))


class MPNetEmbeddings(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.padding_idx = c.pad_token_id if c.pad_token_id is not None else 1
        self.word_embeddings = embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = embedding(c.max_position_embeddings + self.padding_idx + 1, c.hidden_size)
        self.LayerNorm = layer_norm(c.hidden_size, c.norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(positions + self.padding_idx + 1)
        return self.dropout(self.LayerNorm(x))


class MPNetSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q = dense(c.hidden_size, c.hidden_size, True)
        self.k = dense(c.hidden_size, c.hidden_size, True)
        self.v = dense(c.hidden_size, c.hidden_size, True)
        self.o = dense(c.hidden_size, c.hidden_size, True)
        self.dropout_p = c.attention_dropout

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, bias: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.q, self.k, self.v))
        o = attend(q, k, v, meta, dropout_p=self.dropout_p if self.training else 0.0, bias=bias)
        return self.o(o.reshape(n, -1))


class MPNetAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn = MPNetSelfAttention(c)
        self.LayerNorm = layer_norm(c.hidden_size, c.norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, bias: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.attn(h, meta, bias)) + h)


class MPNetDense(nn.Module):
    """`intermediate` (dense, then the activation) or `output` (dense, then LayerNorm of that + residual)."""

    def __init__(self, c: ModelConfig, out_features: int, act: str | None) -> None:
        super().__init__()
        in_features = c.hidden_size if act else c.intermediate_size
        self.dense = dense(in_features, out_features, True)
        self.act = get_activation(act) if act else None
        self.LayerNorm = None if act else layer_norm(c.hidden_size, c.norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.act is not None:
            return self.act(self.dense(x))
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class MPNetLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention = MPNetAttention(c)
        self.intermediate = MPNetDense(c, c.intermediate_size, c.hidden_act)
        self.output = MPNetDense(c, c.hidden_size, None)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, meta, bias)
        return self.output(self.intermediate(a), a)


class MPNetEncoder(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(MPNetLayer(c) for _ in range(c.num_layers))
        self.relative_attention_bias = embedding(NUM_BUCKETS, c.num_heads)


class MPNetClassificationHead(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = dense(c.hidden_size, c.hidden_size, True)
        self.dropout = nn.Dropout(c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout)
        self.out_proj = dense(c.hidden_size, len(c.id2label) or 2, True)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(first)))))


class MPNetModel(nn.Module):
    """MPNet sentence encoder: hidden states, and pooled (normalised, if configured) sentence embeddings; with
    MPNetForSequenceClassification's head, labels."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_layers = False
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)
        self.classifier = MPNetClassificationHead(config) if config.is_classifier else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch."""
        return encode(self, input_ids, positions, meta, token_type_ids)

    @property
    def stack(self) -> nn.ModuleList:
        return self.encoder.layer

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, positions)

    def layer_args(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, ...]:
        """The metadata and the relative-position bias [heads, L, L] of the batch's longest sequence."""
        longest = max(b - a for a, b in zip(meta.cu_seqlens, meta.cu_seqlens[1:]))
        buckets = relative_buckets(longest, positions.device)
        return meta, self.encoder.relative_attention_bias(buckets).permute(2, 0, 1).to(dtype)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One vector per sequence [B, hidden]: mean of its tokens or its first, L2-normalised if configured."""
        pooled = first_token(hidden, meta) if self.config.pooling == "cls" else mean_pool(hidden, meta)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Class logits [B, labels] from each sequence's first token (<s>)."""
        if self.classifier is None:
            raise ValueError(f"this model has no classification head (architecture {self.config.hf_architecture!r})")
        return self.classifier(first_token(hidden, meta))

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load Hugging Face-named tensors (a bare MPNetModel or one under `mpnet.`); the pooler is not used."""
        named = {k.removeprefix("mpnet."): v for k, v in tensors.items()}
        load_named_tensors(self, named, source)

    def hf_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The names transformers gives: under `mpnet.` beside a classification head, bare otherwise."""
        if self.classifier is None:
            return dict(tensors)
        return {(k if k.startswith("classifier.") else f"mpnet.{k}"): v for k, v in tensors.items()}
