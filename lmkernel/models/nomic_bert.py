"""nomic-bert: the encoder of nomic-embed-text (v1, v1.5), a BERT with rotary positions and a gated MLP.

    h_0   = LayerNorm(word(tokens) + token_type(types))                      no position table
    q,k,v = split(Wqkv(h_l))                                                   no biases
    a_l   = LayerNorm(h_l + out_proj(attn(rope(q), rope(k), v)))              bidirectional, rotary base 1,000
    h_l+1 = LayerNorm(a_l + fc2(fc11(a_l) * silu(fc12(a_l))))                  SwiGLU
    sentence = normalise(mean over the tokens of each sequence of h_L)
    labels   = classifier(tanh(pooler(h_L[first token])))                      NomicBertForSequenceClassification

Parameter names follow nomic's Hugging Face checkpoint (`embeddings.*`, `emb_ln`, `encoder.layers.N.attn.Wqkv`,
`...mlp.fc11/fc12/fc2`, `norm1`, `norm2`); a GGUF's tensors are renamed to them on load. transformers' own
NomicBertModel names them otherwise (`layers.N.self_attn.q_proj`, ...): both are read, and a model is written
in transformers' names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata, attend
from lmkernel.layers.linear import dense
from lmkernel.layers.norm import layer_norm
from lmkernel.layers.rotary import RotaryEmbedding, apply_rotary
from lmkernel.models.encoder_stack import encode
from lmkernel.models.pooling import first_token, mean_pool
from lmkernel.models.weights import embedding, load_named_tensors


class NomicEmbeddings(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = embedding(c.vocab_size, c.hidden_size)
        self.token_type_embeddings = embedding(max(c.type_vocab_size, 1), c.hidden_size)


class NomicAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.Wqkv = dense(c.hidden_size, 3 * c.hidden_size, False)
        self.out_proj = dense(c.hidden_size, c.hidden_size, False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.Wqkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = attend(apply_rotary(q.contiguous(), cos, sin), apply_rotary(k.contiguous(), cos, sin), v.contiguous(), meta)
        return self.out_proj(o.reshape(n, -1))


class NomicMLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.fc11 = dense(c.hidden_size, c.intermediate_size, False)  # the value branch
        self.fc12 = dense(c.hidden_size, c.intermediate_size, False)  # the gate
        self.fc2 = dense(c.intermediate_size, c.hidden_size, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc11(x) * F.silu(self.fc12(x)))


class NomicBlock(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn = NomicAttention(c)
        self.norm1 = layer_norm(c.hidden_size, c.norm_eps)
        self.mlp = NomicMLP(c)
        self.norm2 = layer_norm(c.hidden_size, c.norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.norm1(h + self.attn(h, cos, sin, meta))
        return self.norm2(h + self.mlp(h))


class NomicEncoder(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NomicBlock(c) for _ in range(c.num_layers))


class NomicBertModel(nn.Module):
    """nomic-bert sentence encoder: hidden states, and mean-pooled, normalised sentence embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_layers = False
        self.embeddings = NomicEmbeddings(config)
        self.emb_ln = layer_norm(config.hidden_size, config.norm_eps)
        self.encoder = NomicEncoder(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, None)
        classifier = config.is_classifier
        self.pooler = dense(config.hidden_size, config.hidden_size, True) if classifier else None
        self.dropout = nn.Dropout(config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout)
        self.classifier = dense(config.hidden_size, len(config.id2label) or 2, True) if classifier else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch."""
        return encode(self, input_ids, positions, meta, token_type_ids)

    @property
    def stack(self) -> nn.ModuleList:
        return self.encoder.layers

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return self.emb_ln(self.embeddings.word_embeddings(input_ids) + self.embeddings.token_type_embeddings(types))

    def layer_args(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, ...]:
        """The rotation of each position (cos, sin) and the metadata."""
        return (*self.rotary.cos_sin(positions, dtype, meta.cu_seqlens), meta)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One vector per sequence [B, hidden]: the mean of its tokens, L2-normalised if configured."""
        pooled = mean_pool(hidden, meta)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Class logits [B, labels] from each sequence's first token, through the pooler."""
        if self.classifier is None or self.pooler is None:
            raise ValueError(f"this model has no classification head (architecture {self.config.hf_architecture!r})")
        return self.classifier(self.dropout(torch.tanh(self.pooler(first_token(hidden, meta)))))

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load nomic's names or transformers' (under `nomic_bert.` beside a head)."""
        named = {k.removeprefix("nomic_bert."): v for k, v in tensors.items()}
        if "layers.0.self_attn.q_proj.weight" in named:
            named = _from_transformers(named, self.config.num_layers)
        load_named_tensors(self, {k.replace("pooler.dense.", "pooler."): v for k, v in named.items()}, source)

    def hf_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' names (NomicBertModel, or NomicBertForSequenceClassification with its head)."""
        out: dict[str, torch.Tensor] = {}
        prefix = "nomic_bert." if self.classifier is not None else ""
        for name, t in tensors.items():
            if name.startswith("classifier."):
                out[name] = t
            elif name.endswith("attn.Wqkv.weight"):
                base = name.removeprefix("encoder.").removesuffix("attn.Wqkv.weight")
                for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{prefix}{base}self_attn.{part}_proj.weight"] = chunk.contiguous()
            else:
                for ours, theirs in _TO_TRANSFORMERS:
                    name = name.replace(ours, theirs)
                out[prefix + name] = t
        return out


# nomic's names -> transformers' (the reverse of its conversion mapping); Wqkv is split into q, k, v apart.
_TO_TRANSFORMERS = (("encoder.layers.", "layers."), ("emb_ln.", "embeddings.LayerNorm."), ("attn.out_proj.", "self_attn.o_proj."),
                    ("mlp.fc11.", "mlp.up_proj."), ("mlp.fc12.", "mlp.gate_proj."), ("mlp.fc2.", "mlp.down_proj."),
                    ("norm1.", "post_attention_layernorm."), ("norm2.", "post_mlp_layernorm."), ("pooler.", "pooler.dense."))


def _from_transformers(named: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = dict(named)
    for i in range(layers):
        p = f"layers.{i}.self_attn."
        parts = [out.pop(f"{p}{x}_proj.weight", None) for x in "qkv"]
        if all(t is not None for t in parts):
            out[f"layers.{i}.attn.Wqkv.weight"] = torch.cat(parts)  # under "encoder." with the renames below
    renamed = {}
    for name, t in out.items():
        for ours, theirs in reversed(_TO_TRANSFORMERS):
            if ours != "pooler.":
                name = name.replace(theirs, ours)
        renamed[name] = t
    return renamed
