"""Writing a model as a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
lmkernel and transformers both load. Written to a temporary directory beside the target and renamed
into place, so a failure never leaves half a model behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmkernel.config import ModelConfig
from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer

_LLAMA_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for a `ModelConfig`, in the keys transformers reads for that architecture."""
    common = {"vocab_size": config.vocab_size, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
              "pad_token_id": config.pad_token_id, "tie_word_embeddings": config.tie_word_embeddings,
              "torch_dtype": _DTYPE_NAMES.get(dtype, "float32")}
    if config.architecture == "llama":
        model_type = config.hf_model_type if config.hf_model_type in _LLAMA_CLASSES else "llama"
        cls = _LLAMA_CLASSES[model_type]
        out = {
            "model_type": model_type,
            "architectures": [cls.replace("ForCausalLM", "ForSequenceClassification") if config.is_classifier else cls],
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
            "hidden_act": config.hidden_act, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
            "attention_bias": config.attention_bias, "attention_dropout": config.attention_dropout,
        }
        if config.sliding_window is not None:
            out.update(sliding_window=config.sliding_window, use_sliding_window=True)
        if config.id2label:
            out.update(id2label={str(k): v for k, v in config.id2label.items()},
                       label2id={v: k for k, v in config.id2label.items()})
        return {**out, **common}
    if config.architecture == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": config.hidden_size,
                "n_inner": config.intermediate_size, "n_layer": config.num_layers, "n_head": config.num_heads,
                "n_positions": config.max_position_embeddings, "layer_norm_epsilon": config.norm_eps,
                "activation_function": config.hidden_act, "resid_pdrop": config.hidden_dropout,
                "embd_pdrop": config.hidden_dropout, "attn_pdrop": config.attention_dropout, **common}
    if config.architecture == "gemma3" and config.bidirectional:
        out = _gemma3_encoder_config(config)
    elif config.architecture == "nomic_bert":
        # transformers' NomicBertConfig; `matryoshka*` are lmkernel's (how `dimensions` cuts v1.5)
        out = {"model_type": "nomic_bert", "architectures": [config.hf_architecture or "NomicBertModel"],
               "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
               "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
               "max_position_embeddings": config.max_position_embeddings, "layer_norm_eps": config.norm_eps,
               "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, "hidden_act": "silu",
               "type_vocab_size": max(config.type_vocab_size, 1), "hidden_dropout_prob": config.hidden_dropout,
               "attention_probs_dropout_prob": config.attention_dropout, "classifier_dropout": config.classifier_dropout,
               "matryoshka": config.matryoshka, "matryoshka_layer_norm": config.matryoshka_layer_norm}
    elif config.architecture in ("bert", "mpnet"):
        mpnet = config.architecture == "mpnet"
        out = {"model_type": config.architecture, "architectures": [config.hf_architecture or "BertModel"],
               "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
               "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
               # MPNet's table counts positions from the padding id + 1 (see hf_dir)
               "max_position_embeddings": config.max_position_embeddings + (_pad(config) + 1 if mpnet else 0),
               "layer_norm_eps": config.norm_eps, "hidden_act": config.hidden_act,
               "hidden_dropout_prob": config.hidden_dropout, "attention_probs_dropout_prob": config.attention_dropout,
               "classifier_dropout": config.classifier_dropout}
        out.update({"relative_attention_num_buckets": 32} if mpnet else {"type_vocab_size": config.type_vocab_size})
    else:
        raise LmkError(f"a {config.architecture} model cannot be saved as a Hugging Face directory (lmkernel writes "
                       "Llama-family, GPT-2, BERT, MPNet, nomic-bert and EmbeddingGemma models)")
    if config.id2label:
        out.update(id2label={str(k): v for k, v in config.id2label.items()},
                   label2id={v: k for k, v in config.id2label.items()})
    return {**out, **common}


def _pad(config: ModelConfig) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 1


def _whole(x: float | None) -> float | int | None:
    """An integral number as an int: transformers' configs check the type of some fields."""
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma3_encoder_config(config: ModelConfig) -> dict[str, Any]:
    """EmbeddingGemma's Gemma3TextModel (or Gemma3TextForSequenceClassification) config."""
    window = config.sliding_window
    return {
        "model_type": "gemma3_text", "architectures": [config.hf_architecture or "Gemma3TextModel"],
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
        "hidden_activation": config.hidden_act, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "rope_local_base_freq": config.rope_local_theta, "query_pre_attn_scalar": _whole(config.query_pre_attn_scalar),
        "layer_types": list(config.layer_types), "use_bidirectional_attention": True,
        # the config states the full window; a bidirectional layer sees half of it on either side (see hf_dir)
        "sliding_window": (window - 1) * 2 if window is not None else None,
        "attention_bias": config.attention_bias, "attention_dropout": config.attention_dropout,
    }


def _distinct_tensors(model: torch.nn.Module, store_as: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The state dict without second names of shared tensors (a tied head is stored once), the
    tensors named in `store_as` cast to the dtype given there."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to(store_as.get(name, t.dtype)).contiguous().cpu()
    return out


def _tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = dict(tokenizer.special_tokens)
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=tokenizer.clean_up_spaces,
                  model_max_length=1_000_000)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _sentence_transformer_files(config: ModelConfig, directory: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """The sentence-transformers modules (pooling, Dense layers, normalisation, truncation, prompts) of an
    encoder, so the saved model embeds exactly as the one it came from."""
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    for i, (n_in, n_out, bias, activation) in enumerate(config.sentence_dense):
        idx = len(modules)
        folder = directory / f"{idx}_Dense"
        folder.mkdir()
        modules.append({"idx": idx, "name": str(idx), "path": folder.name, "type": "sentence_transformers.models.Dense"})
        act = "torch.nn.modules.activation.Tanh" if activation == "tanh" else "torch.nn.modules.linear.Identity"
        (folder / "config.json").write_text(json.dumps({"in_features": n_in, "out_features": n_out, "bias": bias,
                                                        "activation_function": act}, indent=2))
        weights = {f"linear.{name}": tensors[f"head.sentence_dense.{i}.{name}"].detach().contiguous().cpu()
                   for name in (("weight", "bias") if bias else ("weight",))}
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config.normalize_embeddings:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (directory / f"{idx}_Normalize").mkdir()
    if config.prompts:
        (directory / "config_sentence_transformers.json").write_text(json.dumps({"prompts": config.prompts}, indent=2))
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": config.pooling == "cls",
               "pooling_mode_mean_tokens": config.pooling == "mean"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    if config.max_seq_length:
        (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": config.max_seq_length}))


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that already holds a model or files, unless overwriting."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise LmkError(f"-o {out_dir}: already exists and is not empty; pass --overwrite to replace it")


def save_model_dir(model: torch.nn.Module, config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype,
                   out_dir: Path, overwrite: bool = False, extra_config: Mapping[str, Any] | None = None,
                   extra_files: Mapping[str, str] | None = None,
                   store_as: Mapping[str, torch.dtype] | None = None) -> Path:
    """Write the model; the directory appears whole or not at all. `store_as` names tensors to
    store in another dtype (embeddings a quantized model holds in bfloat16 values)."""
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        cfg = {**hf_config(config, dtype), **(extra_config or {})}
        tensors = _distinct_tensors(model, store_as or {})
        if any(name.endswith(".blocks") for name in tensors):
            raise LmkError(f"-o {out_dir}: the model holds GGUF blocks; load it with quantization=None (dequantized) "
                           "to write it as a Hugging Face directory")
        named = model.hf_tensors(tensors) if hasattr(model, "hf_tensors") else tensors
        save_file(named, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _tokenizer_files(tokenizer, tmp)
        if config.is_encoder:
            _sentence_transformer_files(config, tmp, tensors)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def publish(tmp: Path, out_dir: Path) -> None:
    """Put the finished directory `tmp` at `out_dir` by renames, replacing what was there."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
