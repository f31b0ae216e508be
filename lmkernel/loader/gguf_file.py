"""GGUF files (llama.cpp's format): metadata into `ModelConfig`, tensors under Hugging Face names, weights kept
in their blocks or dequantized."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmkernel.config import ModelConfig
from lmkernel.errors import UnsupportedModelError, WeightsError
from lmkernel.loader.gguf_reader import GGUFFile


def open_reader(path: Path) -> GGUFFile:
    """Open a GGUF file, turning the reader's low-level failures into a `WeightsError` naming the file."""
    try:
        return GGUFFile(path)
    except Exception as exc:  # ValueError from the header, OSError/numpy errors from the mapping
        raise WeightsError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every metadata key of the file as plain Python values (strings, numbers, lists)."""
    return dict(reader.metadata)


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "nomic-bert")
# llama.cpp's converter permutes the Q and K rows of these architectures for its rope layout.
_PERMUTED_QK = ("llama", "mistral")
_T = gguf.GGMLQuantizationType
# Every type the CPU kernels run on its blocks (and dequantize).
KERNEL_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q5_K, _T.Q6_K)
SUPPORTED_TENSOR_TYPES = KERNEL_TYPES

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",  # nosec B105  # a token or tensor name, not a password
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms its sublayers' outputs too, and its queries and keys; its "ffn_norm" is the one before the MLP.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# nomic-bert, under the names of nomic's own checkpoint.
_NOMIC_GLOBAL_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",  # nosec B105  # a tensor name, not a password
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "emb_ln.weight",
    "token_embd_norm.bias": "emb_ln.bias",
}
_NOMIC_LAYER_NAMES = {
    "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "attn_output_norm": "norm1",
    "ffn_up": "mlp.fc11", "ffn_gate": "mlp.fc12", "ffn_down": "mlp.fc2", "layer_output_norm": "norm2",
}
_NAMES_BY_ARCH = {"gemma3": (_GLOBAL_NAMES, _GEMMA3_LAYER_NAMES, "model.layers"),
                  "nomic-bert": (_NOMIC_GLOBAL_NAMES, _NOMIC_LAYER_NAMES, "encoder.layers")}
# nomic-embed's task prefixes (its sentence-transformers config; a GGUF does not carry them).
NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: ", "classification": "classification: ",
                 "clustering": "clustering: "}
# llama.cpp stores Gemma's (1 + w) norm weights with the one added; Hugging Face names hold w.
_NORM_OFFSET_ARCHS = ("gemma3",)
# Gemma 3 in llama.cpp: every sixth layer global, the others local with a rotary base of 10,000; scores
# scaled by the head width, but by hidden / heads in the 62-layer (27B) model.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_BASE, _GEMMA3_27B_LAYERS = 6, 10_000.0, 62


def _meta(metadata: dict[str, Any], path: Path, key: str, default: Any = None) -> Any:
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
    scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": float(_meta(metadata, path, f"{arch}.rope.scaling.factor"))}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
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
        if value is not None and (not isinstance(value, int) or not 0 <= value < max(len(tokens), c.vocab_size)):
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


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name of architecture `arch`, or None for tensors
    we do not use."""
    global_names, names, layers = _NAMES_BY_ARCH.get(arch, (_GLOBAL_NAMES, _LAYER_NAMES, "model.layers"))
    if gguf_name in global_names:
        return global_names[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        return f"{layers}.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class GGUFTensors:
    """A GGUF file's tensors under Hugging Face names. A weight kept in its blocks appears as
    `{module}.blocks` (uint8 [rows, bytes of a row], a view of the mapped file), its ggml type in `kept`."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)


def _blocks(t: Any) -> torch.Tensor:
    """A tensor's blocks as uint8 [rows, bytes of a row], sharing the mapped file's memory."""
    raw = t.data.view(np.uint8)
    return torch.from_numpy(raw.reshape(t.shape[0], -1) if raw.ndim != 2 else raw)


# (blocks [rows, bytes], ggml type, row width) -> float32 [rows, width], or None where it cannot.
Dequantizer = Callable[[torch.Tensor, int, int], "torch.Tensor | None"]


def _dequantize(path: Path, t: Any, fast: Dequantizer | None) -> torch.Tensor:
    """A tensor dequantized to float32 (by `fast` where it can, else by the gguf package)."""
    if fast is not None and len(t.shape) == 2 and t.tensor_type != _T.F32:
        w = fast(_blocks(t), int(t.tensor_type), t.shape[1])
        if w is not None:
            return w
    try:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read tensor '{t.name}' ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: F32 tensors are views of the file


def load_tensors(
    path: Path, reader: GGUFFile, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
    keep: Callable[[str], bool] | None = None, dequantize: Dequantizer | None = None,
) -> GGUFTensors:
    """Every tensor the model uses, named and laid out as in Hugging Face.

    A 2-D weight whose module `keep` accepts stays in its blocks, as stored (Q/K rows of Llama and
    Mistral reordered, which copies those two); every other tensor is dequantized to `dtype`, by
    `dequantize` (the compiled kernels) where given.
    """
    out = GGUFTensors()
    permute = config.hf_model_type in _PERMUTED_QK
    offset_norms = config.hf_model_type in _NORM_OFFSET_ARCHS
    for t in reader.tensors:
        name = hf_name(t.name, config.hf_model_type)
        if name is None:
            continue
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(x.name for x in SUPPORTED_TENSOR_TYPES)
            raise UnsupportedModelError(
                f"{path}: tensor '{t.name}' has GGUF type {t.tensor_type.name}; lmkernel reads {supported}"
            )
        heads = None
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
        module = name.removesuffix(".weight")
        if keep is not None and len(t.shape) == 2 and name.endswith(".weight") and keep(module):
            blocks = _blocks(t)
            out.tensors[f"{module}.blocks"] = _unpermute(blocks, heads).contiguous() if heads else blocks
            out.kept[module] = int(t.tensor_type)
            continue
        w = _dequantize(path, t, dequantize)
        if offset_norms and name.endswith("norm.weight"):
            w = w - 1.0
        out.tensors[name] = (_unpermute(w, heads) if heads else w).to(device=device, dtype=dtype)
    return out


def parameter_count(reader: GGUFFile) -> int:
    """Number of weights in the file (a tied output layer is stored, and counted, once)."""
    return sum(int(t.n_elements) for t in reader.tensors)
