"""Gemma 3 decoder (text), and its bidirectional use as an encoder (EmbeddingGemma).

    norm(x)  = rms(x) * (1 + w)                                        every norm, w stored as an offset from one
    h_0      = embed(tokens) * sqrt(hidden)
    q, k     = norm_q(q_proj(norm(h_l))), norm_k(k_proj(norm(h_l)))    per head, before the rotation
    a_l      = h_l + norm(o_proj(attn(rope_l(q), rope_l(k), v_proj(norm(h_l)))))
    h_l+1    = a_l + norm(down_proj(gelu_tanh(gate_proj(norm(a_l))) * up_proj(norm(a_l))))
    logits   = embed^T norm(h_L)                                        the head is the embedding matrix

Layers are local or global (five local to one global in the released models): a local layer attends to
the last `sliding_window` tokens and rotates by the local base (10,000), a global layer attends to the
whole context and rotates by the global base (1,000,000, with the model's scaling). Scores are scaled
by query_pre_attn_scalar ** -0.5. Grouped-query attention as in Llama. Parameter names follow
Hugging Face's Gemma3ForCausalLM; EmbeddingGemma's Gemma3TextModel drops the leading `model.`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata, KVLayer, attend
from lmkernel.layers.checkpoint import run_layer
from lmkernel.layers.linear import dense
from lmkernel.layers.lora import LoraRouting, project
from lmkernel.layers.norm import OffsetRMSNorm
from lmkernel.layers.rotary import RotaryEmbedding, apply_rotary
from lmkernel.models.encoder_stack import encode
from lmkernel.models.llama import LlamaMLP
from lmkernel.models.pooling import SentenceHead, mean_pool
from lmkernel.models.weights import embedding, load_named_tensors, load_with_tied_head


class Gemma3Attention(nn.Module):
    def __init__(self, c: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = dense(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias)
        self.k_proj = dense(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.v_proj = dense(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.o_proj = dense(c.num_heads * c.head_dim, c.hidden_size, c.attention_bias)
        self.q_norm = OffsetRMSNorm(c.head_dim, c.norm_eps)
        self.k_norm = OffsetRMSNorm(c.head_dim, c.norm_eps)
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.window = window
        self.dropout_p = c.attention_dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, cache: KVLayer | None
    ) -> torch.Tensor:
        n, lora = x.shape[0], meta.lora
        q = self.q_norm(project(self.q_proj, x, lora).view(n, self.num_heads, self.head_dim))
        k = self.k_norm(project(self.k_proj, x, lora).view(n, self.num_kv_heads, self.head_dim))
        v = project(self.v_proj, x, lora).view(n, self.num_kv_heads, self.head_dim)
        o = attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, meta, scale=self.scale, kv_cache=cache,
                   dropout_p=self.dropout_p if self.training else 0.0, window=self.window)
        return project(self.o_proj, o.reshape(n, -1), lora)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int) -> None:
        super().__init__()
        self.is_local = c.window(index) is not None
        self.input_layernorm = OffsetRMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = Gemma3Attention(c, c.window(index))
        self.post_attention_layernorm = OffsetRMSNorm(c.hidden_size, c.norm_eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)  # gate, up and down as Llama's, with GELU-tanh
        self.post_feedforward_layernorm = OffsetRMSNorm(c.hidden_size, c.norm_eps)

    def forward(
        self, h: torch.Tensor, rotations: tuple[tuple[torch.Tensor, torch.Tensor], ...], meta: AttentionMetadata,
        cache: KVLayer | None,
    ) -> torch.Tensor:
        cos, sin = rotations[self.is_local]
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, meta, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), meta.lora))


class Gemma3Model(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = OffsetRMSNorm(c.hidden_size, c.norm_eps)
        self.embed_scale = c.hidden_size ** 0.5
        self.rotary_global = RotaryEmbedding(c.head_dim, c.rope_theta, c.max_position_embeddings, c.rope_scaling)
        self.rotary_local = RotaryEmbedding(c.head_dim, c.rope_local_theta or c.rope_theta, c.max_position_embeddings, None)
        self.checkpoint_layers = False  # activation checkpointing in training (the trainer turns it on)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_caches: Sequence[KVLayer] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch."""
        h = self.embed(input_ids)
        rotations = self.rotations(positions, meta, h.dtype)
        for i, layer in enumerate(self.layers):
            h = run_layer(layer, self.checkpoint_layers, h, rotations, meta, kv_caches[i] if kv_caches is not None else None)
        return self.norm(h)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden) (in the embeddings' dtype, as Gemma rounds it)."""
        h = self.embed_tokens(input_ids)
        return h * torch.tensor(self.embed_scale, dtype=h.dtype)

    def rotations(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, Any]:
        """(cos, sin) of each position for the global layers' rotary base, then for the local layers'."""
        return (self.rotary_global.cos_sin(positions, dtype, meta.cu_seqlens),
                self.rotary_local.cos_sin(positions, dtype, meta.cu_seqlens))


class _Gemma3Stack(nn.Module):
    """The layer stack under `model`, with the trainer's activation-checkpointing switch passed down to it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)

    @property
    def checkpoint_layers(self) -> bool:
        return self.model.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, on: bool) -> None:
        self.model.checkpoint_layers = on


class Gemma3ForCausalLM(_Gemma3Stack):
    """Gemma 3 with its language-model head (the embedding matrix); `forward` gives hidden states,
    `compute_logits` the scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.lm_head = dense(config.hidden_size, config.vocab_size, False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_caches: Sequence[KVLayer] | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        """Scores over the vocabulary [N, V] for hidden rows; `lora` routes rows to served adapters."""
        return project(self.lm_head, hidden, lora)

    def fused_decode(self) -> None:
        """No compiled whole-model decode step for Gemma 3 yet: its layers run one by one on the same kernels."""
        return None

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load Hugging Face-named tensors; the head is the embedding matrix."""
        load_with_tied_head(self, tensors, source, "lm_head", "model.embed_tokens", True)


class Gemma3Encoder(_Gemma3Stack):
    """EmbeddingGemma: the Gemma 3 stack with no causal mask (local layers see keys less than `sliding_window`
    positions away on either side), mean-pooled, through its Dense layers, L2-normalised."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head = SentenceHead(config.sentence_dense)
        # Gemma3TextForSequenceClassification's head: labels from the last token's final state
        self.score = dense(config.hidden_size, len(config.id2label) or 2, False) if config.is_classifier else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return encode(self, input_ids, positions, meta, token_type_ids)

    @property
    def stack(self) -> nn.ModuleList:
        return self.model.layers

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.embed(input_ids)

    def layer_args(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[Any, ...]:
        return self.model.rotations(positions, meta, dtype), meta, None

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One embedding per sequence: the mean of its tokens, then the Dense layers, then (if configured) L2."""
        pooled = self.head(mean_pool(hidden, meta))
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Class logits [B, labels] from each sequence's last token."""
        if self.score is None:
            raise ValueError(f"this model has no classification head (architecture {self.config.hf_architecture!r})")
        return self.score(hidden[torch.tensor(meta.cu_seqlens[1:], device=hidden.device) - 1])

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a Gemma3TextModel checkpoint (names without the `model.` prefix, or under it beside a `score`
        head) and its Dense modules."""
        named = {(k if k.startswith(("model.", "head.", "score.")) else f"head.{k}" if k.startswith("sentence_dense.")
                  else f"model.{k}"): v for k, v in tensors.items()}
        load_named_tensors(self, named, source)

    def hf_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The names transformers gives (under `model.` beside a `score` head, bare otherwise), without the
        Dense modules: sentence-transformers keeps those in folders of their own."""
        keep = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        return keep if self.score is not None else {k.removeprefix("model."): v for k, v in keep.items()}
