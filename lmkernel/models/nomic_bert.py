"""nomic-bert: the encoder of nomic-embed-text (v1, v1.5), a BERT with rotary positions and a gated MLP.

    h_0   = LayerNorm(word(tokens) + token_type(types))                      no position table
    q,k,v = split(Wqkv(h_l))                                                   no biases
    a_l   = LayerNorm(h_l + out_proj(attn(rope(q), rope(k), v)))              bidirectional, rotary base 1,000
    h_l+1 = LayerNorm(a_l + fc2(fc11(a_l) * silu(fc12(a_l))))                  SwiGLU
    sentence = normalise(mean over the tokens of each sequence of h_L)

Parameter names follow nomic's Hugging Face checkpoint (`embeddings.*`, `emb_ln`, `encoder.layers.N.attn.Wqkv`,
`...mlp.fc11/fc12/fc2`, `norm1`, `norm2`); a GGUF's tensors are renamed to them on load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata, attend
from lmkernel.layers.checkpoint import run_layer
from lmkernel.layers.linear import dense
from lmkernel.layers.norm import layer_norm
from lmkernel.layers.rotary import RotaryEmbedding, apply_rotary
from lmkernel.models.pooling import mean_pool
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

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch."""
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.emb_ln(self.embeddings.word_embeddings(input_ids) + self.embeddings.token_type_embeddings(types))
        cos, sin = self.rotary.cos_sin(positions, h.dtype, meta.cu_seqlens)
        for layer in self.encoder.layers:
            h = run_layer(layer, self.checkpoint_layers, h, cos, sin, meta)
        return h

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One vector per sequence [B, hidden]: the mean of its tokens, L2-normalised if configured."""
        pooled = mean_pool(hidden, meta)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise ValueError("nomic-bert checkpoints have no classification head")

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        load_named_tensors(self, tensors, source)
