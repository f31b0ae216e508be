"""Architecture-neutral model configuration, filled by the loaders and read by the models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ENCODER_ARCHITECTURES = ("bert", "mpnet", "nomic_bert")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes, attention layout, positional scheme, norms and special ids of one model.

    `architecture` picks the model file: "llama" (Llama, Mistral, Qwen2, SmolLM), "gemma3" (and EmbeddingGemma,
    `bidirectional`), "gpt2", or the encoders "bert", "mpnet" and "nomic_bert".
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the Q, K and V projections (Qwen2)
    sliding_window: int | None = None  # attention reaches back this many tokens (Mistral v0.1, Gemma 3); None: all
    # Per layer, "sliding_attention" or "full_attention" (Gemma 3 interleaves them); empty: every layer slides
    # when `sliding_window` is set.
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # rotary base of the sliding layers, where it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root (Gemma); None: head_dim
    bidirectional: bool = False  # a decoder architecture run as an encoder (EmbeddingGemma): no causal mask
    type_vocab_size: int = 0  # BERT token-type embeddings
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stored_dtype: str = "float32"  # dtype (or GGUF tensor types) of the weights on disk
    # Encoder heads and sentence-embedding settings (BERT).
    pooling: str = "mean"  # "mean" or "cls"
    normalize_embeddings: bool = False
    max_seq_length: int | None = None  # truncation length for embeddings (sentence-transformers)
    # sentence-transformers Dense modules after pooling: (in, out, bias, activation: "identity" or "tanh")
    sentence_dense: tuple[tuple[int, int, bool, str], ...] = ()
    prompts: dict[str, str] = field(default_factory=dict)  # named prefixes for embeddings ("query", "document", ...)
    matryoshka: bool = False  # embeddings trained to be cut short (`dimensions`): EmbeddingGemma, nomic-embed v1.5
    matryoshka_layer_norm: bool = False  # layer-norm the pooled vector before cutting it (nomic-embed v1.5's recipe)
    id2label: dict[int, str] = field(default_factory=dict)
    # Dropout probabilities, active only in training mode.
    hidden_dropout: float = 0.0  # after embeddings and on each residual branch
    attention_dropout: float = 0.0  # on the attention probabilities
    classifier_dropout: float | None = None  # before a classification head; None: hidden_dropout
    hf_model_type: str = ""  # the config.json model_type (or GGUF general.architecture) as written
    hf_architecture: str = ""  # the config.json architectures[0], e.g. "BertForMaskedLM"; picks heads

    @property
    def is_encoder(self) -> bool:
        """Whether the model is a bidirectional encoder (embeddings, classification) rather than a decoder."""
        return self.architecture in ENCODER_ARCHITECTURES or self.bidirectional

    @property
    def is_classifier(self) -> bool:
        """Whether the model ends in a sequence-classification head (an encoder's, or a decoder's on its last token)."""
        return self.hf_architecture.endswith("ForSequenceClassification")

    @property
    def window_is_valid(self) -> bool:
        """Whether the sliding window and the local rotary base, if set, are usable (positive integers / numbers)."""
        window_ok = self.sliding_window is None or (
            isinstance(self.sliding_window, int) and not isinstance(self.sliding_window, bool) and self.sliding_window >= 1)
        return window_ok and (self.rope_local_theta is None or self.rope_local_theta > 0) and \
            (not self.layer_types or len(self.layer_types) == self.num_layers)

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (keys less than this many positions back), or None for all."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def max_context(self) -> int:
        """The longest context a request may have: the positions the model was trained for."""
        return self.max_position_embeddings

    @property
    def context_limit_reason(self) -> str:
        """What sets `max_context`, for error messages."""
        return f"the model's context length of {self.max_position_embeddings} tokens"

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as a list, whatever form the source gave them in; generation stops at any
        of them (Qwen2.5 ends a turn with <|im_end|> and a text with <|endoftext|>)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)
