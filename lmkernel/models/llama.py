"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).

    h_0   = embed(tokens)
    a_l   = h_l + o_proj(attn(rope(q_proj(rms(h_l))), rope(k_proj(rms(h_l))), v_proj(rms(h_l))))
    h_l+1 = a_l + down_proj(silu(gate_proj(rms(a_l))) * up_proj(rms(a_l)))
    logits = lm_head(rms(h_L))          lm_head may share the embedding matrix
    classes = score(rms(h_L) of each sequence's last token)          sequence classifiers only

Grouped-query attention: num_kv_heads key/value heads, each serving num_heads / num_kv_heads
query heads. Qwen2 adds a bias to the Q, K and V projections; Mistral v0.1 attends to a sliding window of
the last `sliding_window` tokens. Parameter names follow Hugging Face.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers import cpu_kernels
from lmkernel.layers.activation import get_activation
from lmkernel.layers.attention import AttentionMetadata, DecodeBatch, KVLayer, attend
from lmkernel.layers.checkpoint import run_layer
from lmkernel.layers.linear import Dense, GGUFLinear, Int4Linear, Int8Linear, dense
from lmkernel.layers.lora import LoraRouting, MultiLoraLinear, project
from lmkernel.layers.norm import RMSNorm
from lmkernel.layers.rotary import RotaryEmbedding, apply_rotary
from lmkernel.models.weights import embedding, load_with_tied_head


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = dense(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias)
        self.k_proj = dense(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.v_proj = dense(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias)
        self.o_proj = dense(c.num_heads * c.head_dim, c.hidden_size, False)
        self.dropout_p = c.attention_dropout  # on the attention probabilities, in training

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, cache: KVLayer | None
    ) -> torch.Tensor:
        n, lora = x.shape[0], meta.lora
        q = apply_rotary(project(self.q_proj, x, lora).view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(project(self.k_proj, x, lora).view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = project(self.v_proj, x, lora).view(n, self.num_kv_heads, self.head_dim)
        o = attend(q, k, v, meta, kv_cache=cache, dropout_p=self.dropout_p if self.training else 0.0, window=self.window)
        return project(self.o_proj, o.reshape(n, -1), lora)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = dense(c.hidden_size, c.intermediate_size, False)
        self.up_proj = dense(c.hidden_size, c.intermediate_size, False)
        self.down_proj = dense(c.intermediate_size, c.hidden_size, False)
        self.act = get_activation(c.hidden_act)
        self.silu = c.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        gate, up = project(self.gate_proj, x, lora), project(self.up_proj, x, lora)
        if self.silu and cpu_kernels.silu_mul_applies(gate, up):
            return project(self.down_proj, cpu_kernels.silu_mul(gate, up), lora)
        return project(self.down_proj, self.act(gate) * up, lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = LlamaAttention(c, c.window(index))
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, cache: KVLayer | None
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, cache)
        return h + self.mlp(self.post_attention_layernorm(h), meta.lora)


class LlamaModel(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder with a language-model head; `forward` gives hidden states, `compute_logits` the scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_layers = False  # activation checkpointing in training (the trainer turns it on)
        self.model = LlamaModel(config)
        self.lm_head = dense(config.hidden_size, config.vocab_size, False)
        # A sequence classifier (Qwen2ForSequenceClassification, ...) scores each sequence's last token.
        self.score = dense(config.hidden_size, len(config.id2label) or 2, False) if config.is_classifier else None
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling
        )

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
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype, meta.cu_seqlens)
        for i, layer in enumerate(self.model.layers):
            h = run_layer(layer, self.checkpoint_layers, h, cos, sin, meta, kv_caches[i] if kv_caches is not None else None)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        """Scores over the vocabulary [N, V] for hidden rows; `lora` routes rows to served adapters."""
        return project(self.lm_head, hidden, lora)

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Class logits [B, num_labels] from each sequence's last token (the ...ForSequenceClassification head)."""
        if self.score is None:
            raise ValueError(f"this model has no classification head (architecture {self.config.hf_architecture!r})")
        return self.score(hidden[torch.tensor(meta.cu_seqlens[1:], device=hidden.device) - 1])

    def fused_decode(self) -> FusedDecode | None:
        """The decoder as one compiled call for decode steps, where it applies: on CPU, in float32, every
        projection a plain dense, int8, int4 or GGUF-blocks layer (not LoRA-wrapped), SiLU; else None."""
        c = self.config
        if self.training or c.hidden_act not in ("silu", "swish") or not cpu_kernels.llama_decode_available():
            return None
        layers, blocks = [], True
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = dict(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, gate=mlp.gate_proj,
                           up=mlp.up_proj, down=mlp.down_proj)
            parts = {name: _projection(m) for name, m in linears.items()}
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(p is None for p in parts.values()) or any(n.device.type != "cpu" or n.dtype != torch.float32 for n in norms):
                return None
            layers.append(cpu_kernels.decoder_layer(*(n.detach().contiguous() for n in norms), attn.window, **parts))
            blocks = blocks and all(type(m) is GGUFLinear for m in linears.values())
        decoder = cpu_kernels.llama_decoder(layers, c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps)
        # GGUF blocks read each weight once for a step of many sequences (AMX tiles or the prefill kernel);
        # the dense kinds' row kernels pay for every four, where PyTorch's GEMM does better past 16.
        return FusedDecode(self, decoder, decoder.MAX_SEQUENCES if blocks else 16)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Load Hugging Face-named tensors; a tied head reuses the embedding matrix (as does the unused
        language-model head of a classification checkpoint, which has none)."""
        tied = self.config.tie_word_embeddings or (self.config.is_classifier and "lm_head.weight" not in tensors)
        load_with_tied_head(self, tensors, source, "lm_head", "model.embed_tokens", tied)


def _projection(layer: nn.Module) -> object | None:
    """A projection as the fused decode kernel reads it, or None for a kind it does not run (dynamic int8,
    weights not float32 on CPU); of a LoRA wrapper, its base layer."""
    if type(layer) is MultiLoraLinear:  # the fused call serves steps without adapter tokens: the base layer
        layer = layer.base_layer
    if any(t.device.type != "cpu" for t in layer.buffers()) or any(p.device.type != "cpu" for p in layer.parameters()):
        return None
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().float().contiguous()
    if type(layer) is GGUFLinear:
        return cpu_kernels.projection("gguf_packed" if layer.packed else "gguf", layer.blocks, layer.in_features,
                                      bias=bias, gguf_type=layer.gguf_type)
    if type(layer) is Dense:
        if layer.weight.dtype != torch.float32:
            return None
        return cpu_kernels.projection("float32", layer.weight.detach().contiguous(), layer.in_features, bias=bias)
    if type(layer) is Int8Linear:
        kind = "int8" if layer.group_size is None else "int8_group"
        return cpu_kernels.projection(kind, layer.weight, layer.in_features, scale=layer.weight_scale.float().contiguous(),
                                      bias=bias)
    if type(layer) is Int4Linear:
        packed, scales, mins = layer.cpu_packed()
        return cpu_kernels.projection("int4", packed, layer.in_features, scale=scales, mins=mins, bias=bias)
    return None


class FusedDecode:
    """Every decoder layer of a `LlamaForCausalLM` in one compiled CPU call, for steps where each of
    one to `max_sequences` sequences adds one token (16; 64 on GGUF blocks): the equations above, without
    ~30 framework calls per layer.

    Built once by the model runner (an engine's model does not change under it); the kernel holds each
    layer's weights by name. It runs the steps it `covers`; the model's own forward runs the others (a
    prefill, more sequences).
    """

    def __init__(self, model: LlamaForCausalLM, decoder: object, max_sequences: int) -> None:
        self.model, self.decoder = model, decoder
        self.max_sequences = max_sequences
        self._caches: tuple[object, list[torch.Tensor], list[torch.Tensor]] | None = None  # the runner's, split once

    def covers(self, num_tokens: int, meta: AttentionMetadata, invariant: bool = False) -> bool:
        """Whether it runs this step: every token a decode laid out for the paged kernel, at most `max_sequences`
        of them unless `invariant` (then any number, in pieces)."""
        batch = meta.paged.decode if meta.paged is not None else None
        return (isinstance(batch, DecodeBatch) and len(batch.seqs) == num_tokens
                and (num_tokens <= self.max_sequences or invariant))

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVLayer],
        invariant: bool = False,
    ) -> torch.Tensor:
        """Final hidden states of a step it `covers`. `invariant`: each row's result the same bits whatever rows
        share the step (row kernels only; a step of more than `max_sequences` rows runs in pieces, each reading
        the K/V the pieces before it wrote)."""
        n = input_ids.shape[0]
        if not self.covers(n, meta, invariant):
            raise ValueError(f"the fused decode step covers steps of 1 to {self.max_sequences} decodes through the "
                             f"paged kernel; this step has {n} tokens")
        paged = meta.paged
        batch = paged.decode
        if self._caches is None or self._caches[0] is not kv_caches:
            self._caches = (kv_caches, [c.keys for c in kv_caches], [c.values for c in kv_caches])
        m = self.model
        h = m.model.embed_tokens(input_ids).float().contiguous()
        cos, sin = m.rotary.cos_sin(positions, h.dtype, meta.cu_seqlens)
        cos, sin = cos.contiguous(), sin.contiguous()
        pieces = [
            self.decoder.forward(h[a:b], self._caches[1], self._caches[2], cos[a:b], sin[a:b], paged.slot_mapping[a:b],
                                 batch.tables[a:b], batch.lens[a:b], batch.block_size, invariant=invariant)
            for a, b in ((a, min(n, a + self.max_sequences)) for a in range(0, n, self.max_sequences))
        ]
        return m.model.norm(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
