"""BERT encoder with sentence pooling, a masked-LM head and a sequence-classification head.

    h_0    = LayerNorm(word(tokens) + position(positions) + token_type(types))
    a_l    = LayerNorm(h_l + attention.output.dense(attn(query(h_l), key(h_l), value(h_l))))   bidirectional
    h_l+1  = LayerNorm(a_l + output.dense(gelu(intermediate.dense(a_l))))
    (in training, dropout after the embeddings, on the attention probabilities and on each dense
    output before its residual sum; and before the classifier)
    sentence = normalise(mean over the tokens of each sequence of h_L)          or h_L of [CLS]
    mlm      = decoder(LayerNorm(gelu(transform.dense(h_L)))) + bias            decoder shares word embeddings
    classes  = classifier(tanh(pooler.dense(h_L of [CLS])))

Checkpoints of a bare BertModel name the encoder `embeddings.*`, `encoder.*`; the task models prefix
it with `bert.`. Parameters here always carry the prefix, and loading adds it where missing.
"""

from __future__ import annotations

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
from lmkernel.models.weights import embedding, load_with_tied_head

MLM_ARCHITECTURE = "BertForMaskedLM"
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"


class BertEmbeddings(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = embedding(max(c.type_vocab_size, 1), c.hidden_size)
        self.LayerNorm = layer_norm(c.hidden_size, c.norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.query = dense(c.hidden_size, c.hidden_size, True)
        self.key = dense(c.hidden_size, c.hidden_size, True)
        self.value = dense(c.hidden_size, c.hidden_size, True)
        self.dropout_p = c.attention_dropout

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.query, self.key, self.value))
        return attend(q, k, v, meta, dropout_p=self.dropout_p if self.training else 0.0).reshape(n, -1)


class BertDenseNorm(nn.Module):
    """dense, then LayerNorm of (that + residual): `attention.output` and `output` in Hugging Face's names."""

    def __init__(self, in_features: int, c: ModelConfig) -> None:
        super().__init__()
        self.dense = dense(in_features, c.hidden_size, True)
        self.LayerNorm = layer_norm(c.hidden_size, c.norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertDenseNorm(c.hidden_size, c)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(h, meta), h)


class BertIntermediate(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = dense(c.hidden_size, c.intermediate_size, True)
        self.act = get_activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertDenseNorm(c.intermediate_size, c)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.attention(h, meta)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))


class BertPooler(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = dense(c.hidden_size, c.hidden_size, True)


class BertBackbone(nn.Module):
    def __init__(self, c: ModelConfig, with_pooler: bool) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        self.pooler = BertPooler(c) if with_pooler else None


class BertPredictionTransform(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.dense = dense(c.hidden_size, c.hidden_size, True)
        self.act = get_activation(c.hidden_act)
        self.LayerNorm = layer_norm(c.hidden_size, c.norm_eps)


class BertLMPredictions(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.transform = BertPredictionTransform(c)
        self.decoder = dense(c.hidden_size, c.vocab_size, False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))


class BertMLMHead(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictions(c)


class BertModel(nn.Module):
    """BERT encoder; the MLM or classification head exists when the checkpoint's architecture has it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_layers = False  # activation checkpointing in training (the trainer turns it on)
        has_classifier = config.hf_architecture == CLASSIFIER_ARCHITECTURE
        self.bert = BertBackbone(config, with_pooler=has_classifier)
        self.cls = BertMLMHead(config) if config.hf_architecture == MLM_ARCHITECTURE else None
        num_labels = len(config.id2label) or 2
        self.classifier = dense(config.hidden_size, num_labels, True) if has_classifier else None
        p = config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch."""
        return encode(self, input_ids, positions, meta, token_type_ids)

    @property
    def stack(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return self.bert.embeddings(input_ids, positions, types)

    def layer_args(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, ...]:
        return (meta,)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One vector per sequence [B, hidden]: mean of its tokens or its first token, then L2-normalised if configured."""
        pooled = first_token(hidden, meta) if self.config.pooling == "cls" else mean_pool(hidden, meta)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores [N, vocab] for every token (BertForMaskedLM checkpoints)."""
        if self.cls is None:
            raise ValueError(f"this model has no masked-LM head (architecture {self.config.hf_architecture!r})")
        p = self.cls.predictions
        t = p.transform.LayerNorm(p.transform.act(p.transform.dense(hidden)))
        return p.decoder(t) + p.bias

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Class logits [B, num_labels] from each sequence's first token (BertForSequenceClassification)."""
        if self.classifier is None or self.bert.pooler is None:
            raise ValueError(f"this model has no classification head (architecture {self.config.hf_architecture!r})")
        first = hidden[torch.tensor(meta.cu_seqlens[:-1], device=hidden.device)]
        return self.classifier(self.dropout(torch.tanh(self.bert.pooler.dense(first))))

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load Hugging Face-named tensors from a bare or task checkpoint; the MLM decoder reuses word embeddings."""
        named = {(f"bert.{k}" if k.startswith(("embeddings.", "encoder.", "pooler.")) else k): v for k, v in tensors.items()}
        if "cls.predictions.decoder.bias" in named:
            named.setdefault("cls.predictions.bias", named["cls.predictions.decoder.bias"])
        if self.cls is not None and "cls.predictions.transform.dense.weight" in named:
            # A head given without its output bias (a LoRA adapter saves only the transform) starts at
            # zero, as transformers initialises it.
            named.setdefault("cls.predictions.bias", torch.zeros(self.config.vocab_size, dtype=named["cls.predictions.transform.dense.weight"].dtype))
        tied = self.cls is not None and self.config.tie_word_embeddings
        load_with_tied_head(
            self, named, source, "cls.predictions.decoder", "bert.embeddings.word_embeddings", tied
        )
