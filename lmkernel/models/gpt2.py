"""GPT-2 decoder.

    h_0    = wte(tokens) + wpe(positions)
    a_l    = h_l + c_proj(attn(split_qkv(c_attn(ln_1(h_l)))))        causal, multi-head
    h_l+1  = a_l + mlp.c_proj(gelu(mlp.c_fc(ln_2(a_l))))
    logits = lm_head(ln_f(h_L))                                      lm_head usually shares wte

Hugging Face stores GPT-2's projections as Conv1D, weight [in, out]; they are transposed into
ordinary [out, in] linear weights when loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.activation import get_activation
from lmkernel.layers.attention import AttentionMetadata, KVLayer, attend
from lmkernel.layers.checkpoint import run_layer
from lmkernel.layers.linear import dense
from lmkernel.layers.lora import LoraRouting, project
from lmkernel.layers.norm import layer_norm
from lmkernel.models.weights import embedding, load_with_tied_head

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.c_attn = dense(c.hidden_size, 3 * c.hidden_size, True)
        self.c_proj = dense(c.hidden_size, c.hidden_size, True)
        self.dropout_p = c.attention_dropout
        self.resid_dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVLayer | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = project(self.c_attn, x, meta.lora).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = attend(q, k, v, meta, kv_cache=cache, dropout_p=self.dropout_p if self.training else 0.0)
        return self.resid_dropout(project(self.c_proj, o.reshape(n, -1), meta.lora))


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c_fc = dense(c.hidden_size, c.intermediate_size, True)
        self.c_proj = dense(c.intermediate_size, c.hidden_size, True)
        self.act = get_activation(c.hidden_act)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        return self.dropout(project(self.c_proj, self.act(project(self.c_fc, x, lora)), lora))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = layer_norm(c.hidden_size, c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = layer_norm(c.hidden_size, c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, cache: KVLayer | None) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), meta, cache)
        return h + self.mlp(self.ln_2(h), meta.lora)


class GPT2Model(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = embedding(c.vocab_size, c.hidden_size)
        self.wpe = embedding(c.max_position_embeddings, c.hidden_size)
        self.drop = nn.Dropout(c.hidden_dropout)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = layer_norm(c.hidden_size, c.norm_eps)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its tied language-model head; `forward` gives hidden states, `compute_logits` the scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_layers = False  # activation checkpointing in training (the trainer turns it on)
        self.transformer = GPT2Model(config)
        self.lm_head = dense(config.hidden_size, config.vocab_size, False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVLayer] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] for the flattened tokens of every sequence in the batch.

        With `kv_caches` (one K/V pair per layer) and paged metadata, new K/V go into the cache and
        attention reads each sequence's whole context from it.
        """
        h = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            h = run_layer(block, self.checkpoint_layers, h, meta, kv_caches[i] if kv_caches is not None else None)
        return self.transformer.ln_f(h)

    def compute_logits(self, hidden: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        """Scores over the vocabulary [N, V] for hidden rows; `lora` routes rows to served adapters."""
        return project(self.lm_head, hidden, lora)

    def fused_decode(self) -> None:
        """GPT-2 offers no compiled decode step: its own forward runs (on the paged decode kernel on CPU)."""
        return None

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load Hugging Face-named tensors, transposing Conv1D weights; a tied head reuses wte."""
        named = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in tensors.items()}
        named = {k: (v.t().contiguous() if k.endswith(_CONV1D) else v) for k, v in named.items()}
        load_with_tied_head(self, named, source, "lm_head", "transformer.wte", self.config.tie_word_embeddings)
