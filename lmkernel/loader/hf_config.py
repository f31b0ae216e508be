"""Hugging Face config.json (and the sentence-transformers files beside it) into a `ModelConfig`, checked against
itself and against the weight files' headers before any model is built from it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmkernel.config import ModelConfig
from lmkernel.errors import LmkError, UnsupportedModelError, WeightsError
from lmkernel.loader.gguf_config import NOMIC_PROMPTS
from lmkernel.loader.hf_dir import check_safetensors, read_json, stored_dtype, weight_files

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm", "smollm3")
SUPPORTED_TYPES = (*LLAMA_TYPES, "gemma3_text", "gpt2", "bert", "mpnet", "nomic_bert")
_DENSE_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh"}


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from the transformers 4 (`rope_scaling`) or 5 (`rope_parameters`) form."""
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling or None


def _require(raw: dict[str, Any], path: Path, *keys: str) -> Any:
    """The value of the first of `keys` that config.json has (transformers' name, then older ones), or an error."""
    for key in keys:
        if key in raw:
            return raw[key]
    raise WeightsError(f"{path}: missing field '{keys[0]}'")


def _sentence_transformers(directory: Path) -> dict[str, Any]:
    """Pooling, Dense layers, normalisation, truncation and prompts from a sentence-transformers layout, if present."""
    out: dict[str, Any] = {}
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return out
    modules = json.loads(modules_file.read_text())
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise WeightsError(f"{modules_file}: expected a list of modules, each an object with 'type' and 'path'")
    types = [str(m.get("type", "")) for m in modules]
    out["normalize_embeddings"] = any(t.endswith("Normalize") for t in types)
    dense = []
    for m, kind in zip(modules, types):
        if kind.endswith("Pooling"):
            pooling = read_json(directory / str(m.get("path", "")) / "config.json")
            out["pooling"] = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        elif kind.endswith("models.Dense"):
            dense.append(_dense_module(directory / str(m.get("path", ""))))
    out["sentence_dense"] = tuple(dense)
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        out["max_seq_length"] = read_json(st_config).get("max_seq_length")
    prompts_file = directory / "config_sentence_transformers.json"
    if prompts_file.is_file():
        prompts = read_json(prompts_file).get("prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
            raise WeightsError(f"{prompts_file}: 'prompts' must map names to prefix strings")
        out["prompts"] = dict(prompts)
    return out


def _dense_module(folder: Path) -> tuple[int, int, bool, str]:
    """A sentence-transformers Dense module's (in, out, bias, activation), checked against its weights."""
    config = read_json(folder / "config.json")
    activation = _DENSE_ACTIVATIONS.get(str(config.get("activation_function")))
    sizes = (config.get("in_features"), config.get("out_features"))
    if activation is None or not all(isinstance(n, int) and 1 <= n <= MAX_SIZE for n in sizes):
        raise UnsupportedModelError(f"{folder / 'config.json'}: a Dense module needs in_features and out_features and "
                                    f"an activation among {sorted(_DENSE_ACTIVATIONS)}; got {config}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WeightsError(f"{folder}: a Dense module without model.safetensors")
    header = check_safetensors(weights)
    if header.get("linear.weight", {}).get("shape") != [sizes[1], sizes[0]]:
        raise WeightsError(f"{weights}: expected 'linear.weight' of shape {[sizes[1], sizes[0]]}")
    return sizes[0], sizes[1], bool(config.get("bias", True)), activation


def _eos_ids(directory: Path, raw: dict[str, Any]) -> int | list[int] | None:
    """config.json's eos_token_id, with every other one generation_config.json lists (Qwen2.5 lists
    <|im_end|> and <|endoftext|>)."""
    ids: list[Any] = []
    sources = [raw.get("eos_token_id")]
    if (directory / "generation_config.json").is_file():
        sources.append(read_json(directory / "generation_config.json").get("eos_token_id"))
    for value in sources:
        ids += value if isinstance(value, list) else [value]
    ids = [int(i) for i in dict.fromkeys(ids) if isinstance(i, int)]
    return None if not ids else ids[0] if len(ids) == 1 else ids


MAX_POSITIONS = 1 << 24  # no released model's context comes near; past it a value is a typo or an attack
MAX_SIZE = 1 << 24  # nor any width or vocabulary
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h)\.(\d+)\.")


def parse_config(directory: Path) -> ModelConfig:
    """Read `config.json` (and sentence-transformers files beside it) into a `ModelConfig`, checked against
    itself and against the weight files' headers (layer count, embedding table) before any model is built
    from it: a crafted config must not make a model of a billion layers."""
    path = directory / "config.json"
    try:
        config = _parse_config(directory)
    except LmkError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise WeightsError(f"{path}: a value does not describe a model ({type(exc).__name__}: {exc})") from None
    check_config(directory, config)
    return config


def check_config(directory: Path, c: ModelConfig) -> None:
    """Sizes positive and consistent, and the layer count and embedding table those of the weight files."""
    path = directory / "config.json"
    rules = [("vocab_size", 1 <= c.vocab_size <= MAX_SIZE), ("hidden_size", 1 <= c.hidden_size <= MAX_SIZE),
             ("intermediate_size", 1 <= c.intermediate_size <= MAX_SIZE), ("num_hidden_layers", c.num_layers >= 1),
             ("num_attention_heads", c.num_heads >= 1 and 1 <= c.head_dim and c.num_heads * c.head_dim <= MAX_SIZE),
             ("num_key_value_heads", 1 <= c.num_kv_heads <= c.num_heads and c.num_heads % c.num_kv_heads == 0),
             ("max_position_embeddings", 1 <= c.max_position_embeddings <= MAX_POSITIONS),
             ("norm eps", 0 < c.norm_eps < 1), ("rope_theta", c.rope_theta > 0),
             ("hidden_act", isinstance(c.hidden_act, str)), ("architectures", isinstance(c.hf_architecture, str)),
             ("sliding_window", c.window_is_valid)]
    for key, ok in rules:
        if not ok:
            raise WeightsError(f"{path}: '{key}' does not describe a model (vocab {c.vocab_size}, hidden {c.hidden_size}, "
                               f"intermediate {c.intermediate_size}, {c.num_layers} layers, {c.num_heads} heads / "
                               f"{c.num_kv_heads} K/V heads of {c.head_dim}, {c.max_position_embeddings} positions, "
                               f"eps {c.norm_eps}, rope theta {c.rope_theta})")
    shapes = {name: info["shape"] for f in weight_files(directory) for name, info in check_safetensors(f).items()
              if name != "__metadata__"}
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.search(name))}
    if layers and (len(layers) != c.num_layers or max(layers) != c.num_layers - 1):
        raise WeightsError(f"{path}: num_hidden_layers is {c.num_layers}, but the weight files hold layers "
                           f"{min(layers)}..{max(layers)} ({len(layers)} of them)")
    table = next((n for n in shapes if n.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight"))), None)
    if table is not None and list(shapes[table]) != [c.vocab_size, c.hidden_size]:
        raise WeightsError(f"{path}: vocab_size {c.vocab_size} and hidden size {c.hidden_size} do not fit the weight files' "
                           f"embedding table '{table}' of shape {list(shapes[table])}")


def _parse_config(directory: Path) -> ModelConfig:
    """config.json into a `ModelConfig` by its model_type, not yet checked (`parse_config` checks it)."""
    path = directory / "config.json"
    raw = read_json(path)
    model_type = raw.get("model_type", "")
    architecture = (raw.get("architectures") or [""])[0]
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{path}: model_type '{model_type}' is not supported; expected one of {list(SUPPORTED_TYPES)}"
        )
    common = _common_fields(directory, raw, model_type, architecture)
    if model_type == "gpt2":
        return _gpt2_config(directory, raw, common)
    if model_type == "nomic_bert":
        return _nomic_config(directory, raw, common)
    hidden = int(_require(raw, path, "hidden_size"))
    heads = int(_require(raw, path, "num_attention_heads"))
    if model_type in ("bert", "mpnet"):
        return _bert_config(directory, raw, model_type, hidden, heads, common)
    if model_type == "gemma3_text":
        return _gemma3_config(directory, raw, hidden, heads, common)
    return _llama_config(directory, raw, model_type, hidden, heads, common)


def _common_fields(directory: Path, raw: dict[str, Any], model_type: str, architecture: str) -> dict[str, Any]:
    """The fields every model type reads the same way: vocabulary, special ids, stored dtype, names, labels."""
    path = directory / "config.json"
    return dict(
        vocab_size=int(_require(raw, path, "vocab_size")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos_ids(directory, raw),
        pad_token_id=raw.get("pad_token_id"),
        stored_dtype=stored_dtype(directory),
        hf_model_type=model_type,
        hf_architecture=architecture,
        id2label={int(k): v for k, v in (raw.get("id2label") or {}).items()},
    )


def _gpt2_config(directory: Path, raw: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    """GPT-2, in its own keys (n_embd, n_head, n_layer, ...)."""
    path = directory / "config.json"
    hidden, heads = int(_require(raw, path, "n_embd")), int(_require(raw, path, "n_head"))
    return ModelConfig(
        architecture="gpt2",
        hidden_size=hidden,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        num_layers=int(_require(raw, path, "n_layer")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(_require(raw, path, "n_positions")),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        hidden_act=raw.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        hidden_dropout=float(raw.get("resid_pdrop", 0.1)),
        attention_dropout=float(raw.get("attn_pdrop", 0.1)),
        **common,
    )


def _bert_config(directory: Path, raw: dict[str, Any], model_type: str, hidden: int, heads: int,
                 common: dict[str, Any]) -> ModelConfig:
    """BERT or MPNet, with the sentence-transformers layout beside them if present."""
    path = directory / "config.json"
    # MPNet's positions count from the padding id + 1: the table's first rows are never a token's.
    offset = int(raw.get("pad_token_id", 1)) + 1 if model_type == "mpnet" else 0
    bert = model_type == "bert"
    return ModelConfig(
        architecture=model_type,
        hidden_size=hidden,
        intermediate_size=int(_require(raw, path, "intermediate_size")),
        num_layers=int(_require(raw, path, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(_require(raw, path, "max_position_embeddings")) - offset,
        norm_eps=float(raw.get("layer_norm_eps", 1e-12 if bert else 1e-5)),
        hidden_act=raw.get("hidden_act", "gelu"),
        type_vocab_size=int(raw.get("type_vocab_size", 2)) if bert else 0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        hidden_dropout=float(raw.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(raw.get("attention_probs_dropout_prob", 0.1)),
        classifier_dropout=raw.get("classifier_dropout"),
        **_sentence_transformers(directory),
        **common,
    )


def _llama_config(directory: Path, raw: dict[str, Any], model_type: str, hidden: int, heads: int,
                  common: dict[str, Any]) -> ModelConfig:
    """The Llama family: Llama, Mistral, Qwen2 and SmolLM."""
    path = directory / "config.json"
    theta, scaling = _rope(raw)
    window = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
    return ModelConfig(
        architecture="llama",
        hidden_size=hidden,
        intermediate_size=int(_require(raw, path, "intermediate_size")),
        num_layers=int(_require(raw, path, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        sliding_window=window,
        attention_dropout=float(raw.get("attention_dropout", 0.0)),
        **common,
    )


def _nomic_config(directory: Path, raw: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    """nomic-bert in transformers' NomicBertConfig keys, or in nomic's own (GPT-2-style: n_embd, n_layer, ...)."""
    path = directory / "config.json"
    hidden, heads = int(_require(raw, path, "hidden_size", "n_embd")), int(_require(raw, path, "num_attention_heads", "n_head"))
    if raw.get("activation_function", "swiglu") != "swiglu" or raw.get("hidden_act", "silu") != "silu" \
            or raw.get("prenorm") or raw.get("causal") or raw.get("qkv_proj_bias") or raw.get("mlp_fc1_bias") \
            or raw.get("mlp_fc2_bias") or float(raw.get("rotary_emb_fraction", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{path}: lmkernel runs nomic-bert as nomic-embed-text has it (SwiGLU, post-norm, "
                                    "bidirectional, no projection biases, rotary on the whole head)")
    rope = raw.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", raw.get("rotary_emb_base", 1000.0)))
    st = _sentence_transformers(directory)
    v15 = bool(raw.get("matryoshka_layer_norm", False))  # lmkernel's key: the cut that nomic-embed v1.5 takes
    return ModelConfig(
        architecture="nomic_bert", hidden_size=hidden,
        intermediate_size=int(_require(raw, path, "intermediate_size", "n_inner")),
        num_layers=int(_require(raw, path, "num_hidden_layers", "n_layer")), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads if heads > 0 else 0,
        max_position_embeddings=int(_require(raw, path, "max_position_embeddings", "n_positions")),
        norm_eps=float(raw.get("layer_norm_eps", raw.get("layer_norm_epsilon", 1e-12))), rope_theta=theta,
        hidden_act="silu", type_vocab_size=int(raw.get("type_vocab_size", 2)),
        classifier_dropout=raw.get("classifier_dropout"),
        **{"pooling": "mean", "normalize_embeddings": True, **st, "prompts": st.get("prompts") or dict(NOMIC_PROMPTS)},
        matryoshka=v15 or bool(raw.get("matryoshka", False)), matryoshka_layer_norm=v15, **common,
    )


def _gemma3_config(directory: Path, raw: dict[str, Any], hidden: int, heads: int, common: dict[str, Any]) -> ModelConfig:
    """Gemma 3 text (Gemma3ForCausalLM, or EmbeddingGemma's bidirectional Gemma3TextModel)."""
    path = directory / "config.json"
    layers = int(_require(raw, path, "num_hidden_layers"))
    pattern = int(raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6)))
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise WeightsError(f"{path}: 'layer_types' must name sliding_attention or full_attention for each of {layers} layers")
    params = raw.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    theta = float(full.get("rope_theta", raw.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0)))
    scaling = raw.get("rope_scaling") or {k: v for k, v in full.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    bidirectional = bool(raw.get("use_bidirectional_attention", False))
    window = raw.get("sliding_window")
    if bidirectional and isinstance(window, int):
        window = window // 2 + 1  # as transformers reads it: keys less than half the window away on either side
    return ModelConfig(
        architecture="gemma3",
        hidden_size=hidden,
        intermediate_size=int(_require(raw, path, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32_768)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh")),
        rope_theta=theta,
        rope_scaling=scaling or None,
        rope_local_theta=local_theta,
        tie_word_embeddings=True,
        attention_bias=bool(raw.get("attention_bias", False)),
        sliding_window=window,
        layer_types=tuple(types),
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or raw.get("head_dim") or hidden // heads),
        bidirectional=bidirectional,
        attention_dropout=float(raw.get("attention_dropout", 0.0)),
        matryoshka=bidirectional,  # EmbeddingGemma is trained for 768, 512, 256 and 128 dimensions
        **(_sentence_transformers(directory) if bidirectional else {}),
        **common,
    )


def quantization_config(directory: Path) -> dict[str, Any] | None:
    """The `quantization_config` of config.json, if the checkpoint is quantized."""
    quant = read_json(directory / "config.json").get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise UnsupportedModelError(f"{directory / 'config.json'}: quantization_config must be an object")
    return quant
