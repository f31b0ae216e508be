"""Architecture-neutral model configuration, filled by the loaders and read by the models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Sizes, attention layout, positional scheme, norms and special ids of one model.

    `architecture` picks the model file: "llama" (Llama, Mistral, Qwen2, SmolLM), "gpt2" or "bert".
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
    sliding_window: int | None = None  # attention reaches back this many tokens (Mistral v0.1); None: all
    type_vocab_size: int = 0  # BERT token-type embeddings
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stored_dtype: str = "float32"  # dtype (or GGUF tensor types) of the weights on disk
    # Encoder heads and sentence-embedding settings (BERT).
    pooling: str = "mean"  # "mean" or "cls"
    normalize_embeddings: bool = False
    max_seq_length: int | None = None  # truncation length for embeddings (sentence-transformers)
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
        return self.architecture == "bert"

    @property
    def max_context(self) -> int:
        """The longest context a request may have: the positions the model was trained for, and no more
        than its sliding window (lmkernel attends to the whole context, so longer ones are refused)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def context_limit_reason(self) -> str:
        """What sets `max_context`, for error messages."""
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            return (f"the model's sliding window of {self.sliding_window} tokens (lmkernel refuses longer contexts "
                    "rather than attend to only part of them)")
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


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: tokens per block, and how much memory the blocks may take."""

    block_size: int = 16
    # Bytes for K and V of every layer; None means `memory_fraction` of the memory available.
    memory_bytes: int | None = None
    memory_fraction: float = 0.2
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: tokens computed in one forward, and sequences in one batch."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 2048  # prompt + output tokens one request may reach

