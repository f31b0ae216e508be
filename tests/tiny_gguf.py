"""Writes tiny Llama GGUF files the way llama.cpp's converter does, for loader tests.

The vocabulary is a minimal byte-level BPE (three special tokens, the 256 byte symbols and a few
merges), so Hugging Face converts its tokenizer in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġ a", "i n"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + byte_symbols() + [m.replace(" ", "") for m in MERGES]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows (the inverse of what lmkernel's loader undoes)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _raw_blocks(rows: int, cols: int, qtype: T, seed: int) -> np.ndarray:
    """Random blocks of a type gguf-py cannot quantize to; K-quant blocks get sane f16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):  # d and dmin lead the block
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:  # Q6_K: d closes the block
        blocks[:, -2:] = scale
    return blocks.reshape(rows, cols // block_size * type_size)


def write_llama_gguf(path: Path, model: torch.nn.Module, types: dict[str, T] | None = None,
                     sliding_window: int | None = None) -> Path:
    """Write a Hugging Face LlamaForCausalLM (tied embeddings) to `path` as a GGUF file.

    `types` maps GGUF tensor names to a storage type; others are stored as F32. `sliding_window` writes
    the key Mistral v0.1 files carry. Tensors stored in
    a K-quant (or IQ4_XS) type get random blocks instead of the model's values, so compare such a
    file only with another reader of the same file.
    """
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    vocab = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    layer_names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        for hf, short in layer_names.items():
            tensors[f"blk.{i}.{short}.weight"] = layer.get_submodule(hf).weight
    for name, tensor in tensors.items():
        data = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        qtype = (types or {}).get(name, T.F32)
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32 if qtype == T.F32 else np.float16))
        elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
            w.add_tensor(name, _raw_blocks(*data.shape, qtype, seed=len(name)), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
