"""GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys) into a `ModelConfig`, checked against itself and against
the file's tensor table before any model is built from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmkernel.config import ModelConfig
from lmkernel.errors import UnsupportedModelError, WeightsError
from lmkernel.loader.gguf_file import hf_name
from lmkernel.loader.gguf_reader import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "nomic-bert")
# nomic-embed's task prefixes (its sentence-transformers config; a GGUF does not carry them).
NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: ", "classification": "classification: ",
                 "clustering": "clustering: "}
# Gemma 3 in llama.cpp: every sixth layer global, the others local with a rotary base of 10,000; scores
# scaled by the head width, but by hidden / heads in the 62-layer (27B) model.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_BASE, _GEMMA3_27B_LAYERS = 6, 10_000.0, 62


def _meta(metadata: dict[str, Any], path: Path, key: str, default: Any = None) -> Any:
    """A metadata value, its default where the file leaves it out, or a WeightsError naming a required key."""
    if key in metadata:
        return metadata[key]
    if default is None:
        raise WeightsError(f"{path}: missing GGUF metadata key '{key}'")
    return default


def _number(metadata: dict[str, Any], path: Path, key: str, kind: type, default: Any = None) -> Any:
    """A numeric metadata value as `kind` (int or float), or a WeightsError naming the key."""
    value = _meta(metadata, path, key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    if not ok or not np.isfinite(float(value)):
        raise WeightsError(f"{path}: GGUF metadata '{key}' is {value!r}; expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def parse_config(path: Path, reader: GGUFFile, metadata: dict[str, Any]) -> ModelConfig:
    """GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys) into a `ModelConfig`, checked against itself and
    against the tensor table (every shape the model will read), so that no kernel meets a size it was not told."""
    config = _parse_config(path, reader, metadata)
    check_config(path, config, metadata)
    check_tensor_shapes(path, reader, config)
    return config


def _parse_config(path: Path, reader: GGUFFile, metadata: dict[str, Any]) -> ModelConfig:
    """The metadata into a `ModelConfig` by architecture, not yet checked (`parse_config` checks it)."""
    arch = metadata.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture '{arch}' is not supported; expected one of {list(SUPPORTED_ARCHITECTURES)}"
        )
    if arch == "nomic-bert":
        return _nomic_config(path, reader, metadata)
    hidden = _number(metadata, path, f"{arch}.embedding_length", int)
    heads = _number(metadata, path, f"{arch}.attention.head_count", int)
    if hidden < 1 or heads < 1:
        raise WeightsError(f"{path}: GGUF metadata gives embedding_length {hidden} and head_count {heads}; both must be >= 1")
    head_dim = _number(metadata, path, f"{arch}.attention.key_length", int,
                       metadata.get(f"{arch}.rope.dimension_count") or hidden // heads)
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if not isinstance(tokens, list):
        raise WeightsError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' is not a list of strings")
    scaling = _rope_scaling(metadata, path, arch)
    names = {t.name for t in reader.tensors}
    layers = _number(metadata, path, f"{arch}.block_count", int)
    gemma = _gemma3_fields(metadata, path, layers, hidden, heads, head_dim) if arch == "gemma3" else {}
    fields: dict[str, Any] = dict(
        architecture="llama", hidden_act="silu", tie_word_embeddings="output.weight" not in names,
        hf_architecture="LlamaForCausalLM",
    ) | gemma
    return ModelConfig(
        vocab_size=_number(metadata, path, f"{arch}.vocab_size", int, len(tokens) or None),
        hidden_size=hidden,
        intermediate_size=_number(metadata, path, f"{arch}.feed_forward_length", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_number(metadata, path, f"{arch}.attention.head_count_kv", int, heads),
        head_dim=head_dim,
        max_position_embeddings=_number(metadata, path, f"{arch}.context_length", int),
        norm_eps=_number(metadata, path, f"{arch}.attention.layer_norm_rms_epsilon", float),
        rope_theta=_number(metadata, path, f"{arch}.rope.freq_base", float, 10000.0),
        rope_scaling=scaling,
        sliding_window=metadata.get(f"{arch}.attention.sliding_window") or None,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=end_of_generation_ids(metadata) or None,
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        stored_dtype=stored_dtype(reader),
        hf_model_type=arch,
        **fields,
    )


def _rope_scaling(metadata: dict[str, Any], path: Path, arch: str) -> dict[str, Any] | None:
    """The rotary scaling the file names (type, factor, original context), in transformers' `rope_scaling` form."""
    scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": float(_meta(metadata, path, f"{arch}.rope.scaling.factor"))}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _nomic_config(path: Path, reader: GGUFFile, metadata: dict[str, Any]) -> ModelConfig:
    """A nomic-bert file: a bidirectional encoder, mean-pooled (pooling_type 1) or first-token (2)."""
    a = "nomic-bert"
    hidden, heads = _number(metadata, path, f"{a}.embedding_length", int), _number(metadata, path, f"{a}.attention.head_count", int)
    if hidden < 1 or heads < 1 or hidden % heads:
        raise WeightsError(f"{path}: GGUF metadata gives embedding_length {hidden} and head_count {heads}; expected "
                           "positive sizes, the width a whole number of heads")
    pooling = metadata.get(f"{a}.pooling_type", 1)
    if pooling not in (1, 2):
        raise UnsupportedModelError(f"{path}: GGUF metadata '{a}.pooling_type' is {pooling!r}; lmkernel pools by mean (1) "
                                    "or by the first token (2)")
    types = next((t for t in reader.tensors if t.name == "token_types.weight"), None)
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    v15 = "v1.5" in str(metadata.get("general.name", ""))  # v1.5 is trained for 768 down to 64 dimensions
    return ModelConfig(
        architecture="nomic_bert", vocab_size=len(tokens) if isinstance(tokens, list) and tokens else 0,
        hidden_size=hidden, intermediate_size=_number(metadata, path, f"{a}.feed_forward_length", int),
        num_layers=_number(metadata, path, f"{a}.block_count", int), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, max_position_embeddings=_number(metadata, path, f"{a}.context_length", int),
        norm_eps=_number(metadata, path, f"{a}.attention.layer_norm_epsilon", float),
        rope_theta=_number(metadata, path, f"{a}.rope.freq_base", float, 10000.0), hidden_act="silu",
        type_vocab_size=int(types.shape[0]) if types is not None and len(types.shape) == 2 else 0,
        pooling="mean" if pooling == 1 else "cls", normalize_embeddings=True, prompts=dict(NOMIC_PROMPTS),
        matryoshka=v15, matryoshka_layer_norm=v15,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"), stored_dtype=stored_dtype(reader),
        hf_model_type=a, hf_architecture="NomicBertModel",
    )


def _gemma3_fields(metadata: dict[str, Any], path: Path, layers: int, hidden: int, heads: int,
                   head_dim: int) -> dict[str, Any]:
    """What a Gemma 3 file adds to a config: which layers are local, their rotary base, the score scale,
    the activation and the architecture names."""
    window = metadata.get("gemma3.attention.sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise WeightsError(f"{path}: GGUF metadata 'gemma3.attention.sliding_window' is {window!r}; expected a "
                           "positive integer (Gemma 3's local layers attend to that many tokens)")
    pattern = metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:  # newer files: one flag per layer, true = local
        local = [bool(p) for p in pattern]
    else:
        local = [(i + 1) % _GEMMA3_PATTERN != 0 for i in range(layers)]
    return dict(
        layer_types=tuple("sliding_attention" if s else "full_attention" for s in local),
        rope_local_theta=_number(metadata, path, "gemma3.rope.freq_base_swa", float, _GEMMA3_LOCAL_BASE),
        query_pre_attn_scalar=float(hidden // heads if layers == _GEMMA3_27B_LAYERS else head_dim),
        architecture="gemma3",
        hidden_act="gelu_pytorch_tanh",
        hf_architecture="Gemma3ForCausalLM",
        tie_word_embeddings=True,
    )


def check_config(path: Path, c: ModelConfig, metadata: dict[str, Any]) -> None:
    """Sizes that make a model: positive, heads in whole groups, an even head width, special ids in the vocabulary."""
    rules = [
        ("vocab_size", c.vocab_size >= 1), ("feed_forward_length", c.intermediate_size >= 1),
        ("block_count", 1 <= c.num_layers <= 1024), ("context_length", c.max_position_embeddings >= 1),
        ("head_count_kv", 1 <= c.num_kv_heads <= c.num_heads and c.num_heads % c.num_kv_heads == 0),
        ("key_length", c.head_dim >= 2 and c.head_dim % 2 == 0),
        ("layer_norm_rms_epsilon", 0 < c.norm_eps < 1), ("rope.freq_base", c.rope_theta > 0),
        ("attention.sliding_window", c.window_is_valid),
    ]
    for key, ok in rules:
        if not ok:
            raise WeightsError(f"{path}: GGUF metadata '{key}' does not describe a model (vocab {c.vocab_size}, hidden "
                               f"{c.hidden_size}, feed-forward {c.intermediate_size}, {c.num_layers} layers, "
                               f"{c.num_heads} heads / {c.num_kv_heads} K/V heads of {c.head_dim}, context "
                               f"{c.max_position_embeddings}, eps {c.norm_eps}, rope base {c.rope_theta})")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    for key in ("bos", "eos", "padding", "unknown"):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < max(len(tokens), c.vocab_size)):
            raise WeightsError(f"{path}: GGUF metadata 'tokenizer.ggml.{key}_token_id' is {value!r}; expected an id "
                               f"below the vocabulary's {max(len(tokens), c.vocab_size)}")


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor the model reads, by GGUF name, with its shape (rows first)."""
    if c.architecture == "nomic_bert":
        return _nomic_shapes(c)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, c.hidden_size),
                                          "output_norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (c.hidden_size,), b + "ffn_norm.weight": (c.hidden_size,),
                   b + "attn_q.weight": (q, c.hidden_size), b + "attn_k.weight": (kv, c.hidden_size),
                   b + "attn_v.weight": (kv, c.hidden_size), b + "attn_output.weight": (c.hidden_size, q),
                   b + "ffn_gate.weight": (c.intermediate_size, c.hidden_size),
                   b + "ffn_up.weight": (c.intermediate_size, c.hidden_size),
                   b + "ffn_down.weight": (c.hidden_size, c.intermediate_size)}
        if c.attention_bias:
            shapes |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
        if c.architecture == "gemma3":
            shapes |= {b + "attn_q_norm.weight": (c.head_dim,), b + "attn_k_norm.weight": (c.head_dim,),
                       b + "post_attention_norm.weight": (c.hidden_size,), b + "post_ffw_norm.weight": (c.hidden_size,)}
    return shapes


def _nomic_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor a nomic-bert model reads, by GGUF name, with its shape (rows first)."""
    d, f = c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, d), "token_types.weight": (c.type_vocab_size, d),
                                          "token_embd_norm.weight": (d,), "token_embd_norm.bias": (d,)}
    for i in range(c.num_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_qkv.weight": (3 * d, d), b + "attn_output.weight": (d, d), b + "ffn_up.weight": (f, d),
                   b + "ffn_gate.weight": (f, d), b + "ffn_down.weight": (d, f)}
        shapes |= {b + f"{n}.{p}": (d,) for n in ("attn_output_norm", "layer_output_norm") for p in ("weight", "bias")}
    return shapes


def check_tensor_shapes(path: Path, reader: GGUFFile, c: ModelConfig) -> None:
    """Every tensor the model reads is in the file with the shape the metadata implies, and no layer tensor lies
    past the block count: a changed dimension is refused here, naming the tensor, not met by a kernel."""
    found = {t.name: t for t in reader.tensors}
    for name, shape in _expected_shapes(c).items():
        t = found.get(name)
        if t is None:
            raise WeightsError(f"{path}: tensor '{name}' is missing (the metadata says {c.num_layers} layers)")
        if tuple(t.shape) != shape:
            raise WeightsError(f"{path}: tensor '{name}' has shape {list(t.shape)}; the metadata implies {list(shape)}")
    for name in found:
        index = name.split(".")[1] if hf_name(name, c.hf_model_type) is not None and name.startswith("blk.") else "0"
        if not index.isdigit() or int(index) >= c.num_layers:
            raise WeightsError(f"{path}: tensor '{name}' names no layer of the metadata's {c.num_layers}")


# Control tokens that end a turn or a text in the families people run (llama.cpp's list): Llama-3's
# <|eot_id|>, ChatML's <|im_end|>, Phi's <|end|>, Gemma's <end_of_turn>, GPT-2's and Qwen's <|endoftext|>, ...
_END_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
              "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>")
_CONTROL = 3


def end_of_generation_ids(metadata: dict[str, Any]) -> list[int]:
    """Every id that ends generation: the file's eos (first), eot and eom ids, and each control token
    spelled as one of the usual ends of a turn or a text."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    ids = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ids += [i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and text in _END_TEXTS]
    return [int(i) for i in dict.fromkeys(ids) if i is not None and 0 <= int(i) < max(len(tokens), 1)]


def stored_dtype(reader: GGUFFile) -> str:
    """The GGUF tensor types of the file, most frequent first, e.g. "Q4_1 (210), F32 (61), Q8_0 (1)"."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
