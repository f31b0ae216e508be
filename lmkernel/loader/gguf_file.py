"""GGUF files (llama.cpp's format): metadata into `ModelConfig`, tensors dequantized into Hugging Face names."""

from __future__ import annotations

from collections.abc import Callable
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


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# llama.cpp's converter permutes the Q and K rows of these architectures for its rope layout.
_PERMUTED_QK = ("llama", "mistral")
_T = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q5_K, _T.Q6_K)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
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


def _meta(metadata: dict[str, Any], path: Path, key: str, default: Any = None) -> Any:
    if key in metadata:
        return metadata[key]
    if default is None:
        raise WeightsError(f"{path}: missing GGUF metadata key '{key}'")
    return default


def parse_config(path: Path, reader: GGUFFile, metadata: dict[str, Any]) -> ModelConfig:
    """GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys) into a `ModelConfig`."""
    arch = metadata.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture '{arch}' is not supported; expected one of {list(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = int(_meta(metadata, path, f"{arch}.embedding_length"))
    heads = int(_meta(metadata, path, f"{arch}.attention.head_count"))
    head_dim = int(metadata.get(f"{arch}.attention.key_length") or metadata.get(f"{arch}.rope.dimension_count") or hidden // heads)
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": float(_meta(metadata, path, f"{arch}.rope.scaling.factor"))}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture="llama",
        vocab_size=int(metadata.get(f"{arch}.vocab_size") or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(_meta(metadata, path, f"{arch}.feed_forward_length")),
        num_layers=int(_meta(metadata, path, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(_meta(metadata, path, f"{arch}.context_length")),
        norm_eps=float(_meta(metadata, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        stored_dtype=stored_dtype(reader),
        hf_model_type=arch,
        hf_architecture="LlamaForCausalLM",
    )


def stored_dtype(reader: GGUFFile) -> str:
    """The GGUF tensor types of the file, most frequent first, e.g. "Q4_1 (210), F32 (61), Q8_0 (1)"."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


KEPT_TYPES = (_T.Q4_0, _T.Q4_1, _T.Q8_0)  # blocks of 32: an int4 (or int8) layer with groups of 32
KEPT_GROUP = 32


def _int8_blocks(t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 values [N, K] and scales [N, K/32] of a Q8_0 tensor (blocks of d (f16) and 32 int8: w = d * q)."""
    raw = np.asarray(t.data, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 2 + 32)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    return torch.from_numpy(q), torch.from_numpy(d)


def _int4_blocks(t: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K], scales and minimums [N, K/32] of a Q4_0 or Q4_1 tensor, read from its blocks as stored.

    Q4_1 blocks are d (f16), m (f16), 16 bytes of nibbles: w = d * q + m. Q4_0 blocks are d, 16
    bytes: w = d * (q - 8). In both, low nibbles hold weights 0-15 of the block, high ones 16-31.
    """
    raw = np.asarray(t.data, dtype=np.uint8)
    rows = raw.shape[0]
    head = 4 if t.tensor_type == _T.Q4_1 else 2
    blocks = raw.reshape(rows, -1, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4 else -8.0 * d
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(codes.astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(m)


def load_tensors(
    path: Path, reader: GGUFFile, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor the model uses, dequantized to `dtype` and named and laid out as in Hugging Face.

    Q4_0/Q4_1 weights whose name `keep` accepts stay 4-bit: they come as the `qweight`, `scales` and
    `mins` of an int4 layer with groups of 32 instead of a dense `weight`; Q8_0 ones stay 8-bit, as
    the int8 `weight` and `weight_scale` (groups of 32) of an int8 layer.
    """
    tensors: dict[str, torch.Tensor] = {}
    permute = config.hf_model_type in _PERMUTED_QK
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(x.name for x in SUPPORTED_TENSOR_TYPES)
            raise UnsupportedModelError(
                f"{path}: tensor '{t.name}' has GGUF type {t.tensor_type.name}; lmkernel reads {supported}"
            )
        module = name.removesuffix(".weight")
        if keep is not None and t.tensor_type == _T.Q8_0 and keep(module):
            q, d = _int8_blocks(t)
            if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
                q, d = _unpermute(q, heads), _unpermute(d, heads)
            tensors[f"{module}.weight"] = q.contiguous().to(device)
            tensors[f"{module}.weight_scale"] = d.to(device=device, dtype=dtype)
            continue
        if keep is not None and t.tensor_type in KEPT_TYPES and keep(module):
            parts = _int4_blocks(t)
            if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
                parts = tuple(_unpermute(p, heads) for p in parts)
            codes, scales, mins = parts
            tensors[f"{module}.qweight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().to(device)
            tensors[f"{module}.scales"] = scales.to(device=device, dtype=dtype)
            tensors[f"{module}.mins"] = mins.to(device=device, dtype=dtype)
            continue
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise WeightsError(f"{path}: cannot read tensor '{t.name}' ({type(exc).__name__}: {exc})") from None
        w = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: F32 tensors are read-only memmap views
        if permute and name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        tensors[name] = w.to(device=device, dtype=dtype)
    return tensors


def parameter_count(reader: GGUFFile) -> int:
    """Number of weights in the file (a tied output layer is stored, and counted, once)."""
    return sum(int(t.n_elements) for t in reader.tensors)
