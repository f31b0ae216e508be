"""GGUF files (llama.cpp's format): opened, their tensors under Hugging Face names, weights kept in their blocks or
dequantized. Their metadata becomes a `ModelConfig` in gguf_config."""

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
# llama.cpp stores Gemma's (1 + w) norm weights with the one added; Hugging Face names hold w.
_NORM_OFFSET_ARCHS = ("gemma3",)


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
