"""GGUF metadata into a ModelConfig: every field from its key, the defaults llama.cpp files rely on, Gemma 3's and
nomic-bert's own fields, and the clear errors for missing or bad keys and a tensor table that does not fit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest

from lmkernel.config import ModelConfig
from lmkernel.errors import UnsupportedModelError, WeightsError
from lmkernel.loader.gguf_config import NOMIC_PROMPTS, end_of_generation_ids, parse_config, stored_dtype
from lmkernel.loader.gguf_reader import GGUFFile, GGUFTensor

T = gguf.GGMLQuantizationType
PATH = Path("m.gguf")
TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>", "a", "b", "<|eot_id|>", "c"]
TYPES = [2, 3, 3, 3, 1, 1, 3, 1]  # 3: control
V, D, F, L, HEADS, KV, HD = 8, 16, 24, 2, 4, 2, 4


def _tensor(name: str, shape: tuple[int, ...], kind: T = T.F32) -> GGUFTensor:
    return GGUFTensor(name, kind, shape, int(np.prod(shape)), None)  # type: ignore[arg-type]


def _llama_tensors(layers: int = L, heads: int = HEADS, kv: int = KV, hd: int = HD, tied: bool = True, bias: bool = False,
                   gemma: bool = False, kind: T = T.F32) -> list[GGUFTensor]:
    """The tensor table llama.cpp writes for these sizes, shapes rows first."""
    q, k = heads * hd, kv * hd
    out = [_tensor("token_embd.weight", (V, D), kind), _tensor("output_norm.weight", (D,))]
    if not tied:
        out.append(_tensor("output.weight", (V, D), kind))
    for i in range(layers):
        b = f"blk.{i}."
        out += [_tensor(b + "attn_norm.weight", (D,)), _tensor(b + "ffn_norm.weight", (D,)),
                _tensor(b + "attn_q.weight", (q, D), kind), _tensor(b + "attn_k.weight", (k, D), kind),
                _tensor(b + "attn_v.weight", (k, D), kind), _tensor(b + "attn_output.weight", (D, q), kind),
                _tensor(b + "ffn_gate.weight", (F, D), kind), _tensor(b + "ffn_up.weight", (F, D), kind),
                _tensor(b + "ffn_down.weight", (D, F), kind)]
        if bias:
            out += [_tensor(b + "attn_q.bias", (q,)), _tensor(b + "attn_k.bias", (k,)), _tensor(b + "attn_v.bias", (k,))]
        if gemma:
            out += [_tensor(b + "attn_q_norm.weight", (hd,)), _tensor(b + "attn_k_norm.weight", (hd,)),
                    _tensor(b + "post_attention_norm.weight", (D,)), _tensor(b + "post_ffw_norm.weight", (D,))]
    return out


def _llama_meta(arch: str = "llama", **changes: Any) -> dict[str, Any]:
    meta = {"general.architecture": arch, f"{arch}.embedding_length": D, f"{arch}.attention.head_count": HEADS,
            f"{arch}.attention.head_count_kv": KV, f"{arch}.block_count": L, f"{arch}.feed_forward_length": F,
            f"{arch}.context_length": 128, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{arch}.rope.freq_base": 500000.0, "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TYPES,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def _parse(meta: dict[str, Any], tensors: list[GGUFTensor] | None = None) -> ModelConfig:
    return parse_config(PATH, SimpleNamespace(tensors=_llama_tensors() if tensors is None else tensors), meta)


def test_llama_metadata_becomes_every_field() -> None:
    config = _parse(_llama_meta())
    assert config == ModelConfig(
        architecture="llama", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=HEADS,
        num_kv_heads=KV, head_dim=D // HEADS, max_position_embeddings=128, norm_eps=1e-6, hidden_act="silu",
        rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False, sliding_window=None,
        bos_token_id=1, eos_token_id=[2, 3, 6], pad_token_id=0, stored_dtype="F32 (20)", hf_model_type="llama",
        hf_architecture="LlamaForCausalLM")
    assert isinstance(config.norm_eps, float) and isinstance(config.num_layers, int)


def test_defaults_where_a_file_leaves_keys_out() -> None:
    meta = _llama_meta(**{"llama.attention.head_count_kv": None, "llama.rope.freq_base": None,
                          "llama.attention.head_count": 2, "llama.rope.dimension_count": 8})
    config = _parse(meta, _llama_tensors(heads=2, kv=2, hd=8))
    assert (config.num_kv_heads, config.rope_theta, config.head_dim, config.vocab_size) == (2, 10000.0, 8, len(TOKENS))
    explicit = _parse(_llama_meta(**{"llama.attention.key_length": 2, "llama.vocab_size": V}), _llama_tensors(hd=2))
    assert explicit.head_dim == 2  # key_length wins over hidden / heads


def test_qwen2_untied_with_q_bias_and_mistral_window() -> None:
    qwen = _parse(_llama_meta("qwen2"), _llama_tensors(tied=False, bias=True))
    assert (qwen.tie_word_embeddings, qwen.attention_bias, qwen.hf_model_type, qwen.architecture) == \
        (False, True, "qwen2", "llama")
    mistral = _parse(_llama_meta("mistral", **{"mistral.attention.sliding_window": 64}))
    assert mistral.sliding_window == 64 and mistral.window(1) == 64
    assert _parse(_llama_meta(**{"llama.attention.sliding_window": 0})).sliding_window is None  # 0: none


def test_rope_scaling_in_transformers_form() -> None:
    meta = _llama_meta(**{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4,
                          "llama.rope.scaling.original_context_length": 32})
    assert _parse(meta).rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    linear = _parse(_llama_meta(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert _parse(_llama_meta(**{"llama.rope.scaling.type": "none"})).rope_scaling is None
    with pytest.raises(WeightsError, match=r"^m.gguf: missing GGUF metadata key 'llama.rope.scaling.factor'$"):
        _parse(_llama_meta(**{"llama.rope.scaling.type": "linear"}))


def test_k_quant_files_record_their_types_most_frequent_first() -> None:
    tensors = _llama_tensors(kind=T.Q8_0)
    tensors[4] = _tensor(tensors[4].name, tensors[4].shape, T.Q4_K)  # blk.0.attn_q.weight
    assert _parse(_llama_meta(), tensors).stored_dtype == "Q8_0 (14), F32 (5), Q4_K (1)"
    assert stored_dtype(SimpleNamespace(tensors=[])) == ""


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.attention.head_count", "llama.block_count",
                                 "llama.feed_forward_length", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_a_missing_required_key_is_named(key: str) -> None:
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(**{key: None}))
    assert str(err.value) == f"m.gguf: missing GGUF metadata key '{key}'"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("llama.block_count", "2", "an integer"), ("llama.block_count", 2.5, "an integer"),
    ("llama.block_count", True, "an integer"), ("llama.context_length", float("inf"), "an integer"),
    ("llama.attention.layer_norm_rms_epsilon", "1e-6", "a number"),
    ("llama.rope.freq_base", [10000.0], "a number"),
])
def test_a_value_of_the_wrong_kind_is_named(key: str, value: object, expected: str) -> None:
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(**{key: value}))
    assert str(err.value) == f"m.gguf: GGUF metadata '{key}' is {value!r}; expected {expected}"


def test_whole_floats_are_accepted_as_integers() -> None:
    assert _parse(_llama_meta(**{"llama.block_count": 2.0})).num_layers == 2


def test_zero_width_or_heads_is_refused() -> None:
    with pytest.raises(WeightsError, match=r"^m.gguf: GGUF metadata gives embedding_length 16 and head_count 0; both "
                                           r"must be >= 1$"):
        _parse(_llama_meta(**{"llama.attention.head_count": 0}))


def test_an_unsupported_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        _parse(_llama_meta("phi3"))
    assert str(err.value) == ("m.gguf: GGUF architecture 'phi3' is not supported; expected one of "
                              "['llama', 'mistral', 'qwen2', 'gemma3', 'nomic-bert']")


@pytest.mark.parametrize(("changes", "key"), [
    ({"llama.attention.head_count_kv": 3}, "head_count_kv"),  # 4 heads in groups of 3
    ({"llama.attention.head_count_kv": 8}, "head_count_kv"),  # more K/V heads than heads
    ({"llama.attention.key_length": 3}, "key_length"),  # odd: no rotary halves
    ({"llama.attention.layer_norm_rms_epsilon": 1.0}, "layer_norm_rms_epsilon"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon"),
    ({"llama.rope.freq_base": -1.0}, "rope.freq_base"),
    ({"llama.block_count": 1025}, "block_count"),
    ({"llama.feed_forward_length": 0}, "feed_forward_length"),
    ({"llama.vocab_size": 0, "tokenizer.ggml.tokens": None}, "vocab_size"),
    ({"llama.attention.sliding_window": -4}, "attention.sliding_window"),
])
def test_sizes_that_make_no_model_are_named(changes: dict, key: str) -> None:
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(**changes))
    assert str(err.value).startswith(f"m.gguf: GGUF metadata '{key}' does not describe a model (vocab ")


@pytest.mark.parametrize("key", ["bos", "eos", "padding", "unknown"])
def test_special_ids_must_lie_in_the_vocabulary(key: str) -> None:
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(**{f"tokenizer.ggml.{key}_token_id": V}))
    assert str(err.value) == (f"m.gguf: GGUF metadata 'tokenizer.ggml.{key}_token_id' is {V}; expected an id below "
                              f"the vocabulary's {V}")
    with pytest.raises(WeightsError, match=f"'tokenizer.ggml.{key}_token_id' is -1"):
        _parse(_llama_meta(**{f"tokenizer.ggml.{key}_token_id": -1}))
    with pytest.raises(WeightsError, match=f"'tokenizer.ggml.{key}_token_id' is True"):
        _parse(_llama_meta(**{f"tokenizer.ggml.{key}_token_id": True}))


def test_tokens_that_are_not_a_list_are_refused() -> None:
    with pytest.raises(WeightsError, match=r"^m.gguf: GGUF metadata 'tokenizer.ggml.tokens' is not a list of strings$"):
        _parse(_llama_meta(**{"tokenizer.ggml.tokens": "abc"}))


def test_end_of_generation_ids() -> None:
    meta = {"tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TYPES, "tokenizer.ggml.eos_token_id": 6,
            "tokenizer.ggml.eot_token_id": 2, "tokenizer.ggml.eom_token_id": 99}
    # the file's eos first, then eot (eom out of range: dropped), then control tokens spelled as an end; no repeats
    assert end_of_generation_ids(meta) == [6, 2, 3]
    assert end_of_generation_ids({**meta, "tokenizer.ggml.token_type": [1] * len(TOKENS)}) == [6, 2]  # not control
    assert end_of_generation_ids({}) == []
    assert end_of_generation_ids({"tokenizer.ggml.eos_token_id": 0}) == [0]


def test_tensor_table_must_hold_every_tensor_with_its_shape() -> None:
    tensors = _llama_tensors()
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(), [t for t in tensors if t.name != "blk.1.ffn_up.weight"])
    assert str(err.value) == "m.gguf: tensor 'blk.1.ffn_up.weight' is missing (the metadata says 2 layers)"
    wrong = [_tensor(t.name, (F + 1, D)) if t.name == "blk.0.ffn_gate.weight" else t for t in tensors]
    with pytest.raises(WeightsError) as err:
        _parse(_llama_meta(), wrong)
    assert str(err.value) == "m.gguf: tensor 'blk.0.ffn_gate.weight' has shape [25, 16]; the metadata implies [24, 16]"
    extra = tensors + _llama_tensors(layers=3)[-9:]
    with pytest.raises(WeightsError, match=r"^m.gguf: tensor 'blk.2.attn_norm.weight' names no layer of the metadata's 2$"):
        _parse(_llama_meta(), extra)
    # unused tensors outside the layers are allowed
    assert _parse(_llama_meta(), tensors + [_tensor("rope_freqs.weight", (2,))]).num_layers == 2


def _gemma_meta(**changes: Any) -> dict[str, Any]:
    return _llama_meta("gemma3", **{"gemma3.attention.sliding_window": 32, "gemma3.attention.key_length": 8,
                                    "gemma3.attention.head_count_kv": 1, **changes})


def test_gemma3_every_sixth_layer_is_global() -> None:
    meta = _gemma_meta(**{"gemma3.block_count": 7})
    config = _parse(meta, _llama_tensors(layers=7, kv=1, hd=8, gemma=True))
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (config.architecture, config.hidden_act, config.hf_architecture, config.tie_word_embeddings) == \
        ("gemma3", "gelu_pytorch_tanh", "Gemma3ForCausalLM", True)
    assert (config.sliding_window, config.rope_local_theta, config.query_pre_attn_scalar, config.head_dim) == \
        (32, 10000.0, 8.0, 8)
    assert [config.window(i) for i in range(7)] == [32] * 5 + [None, 32]


def test_gemma3_per_layer_pattern_and_local_base() -> None:
    meta = _gemma_meta(**{"gemma3.attention.sliding_window_pattern": [True, False],
                          "gemma3.rope.freq_base_swa": 20000.0})
    config = _parse(meta, _llama_tensors(kv=1, hd=8, gemma=True))
    assert config.layer_types == ("sliding_attention", "full_attention") and config.rope_local_theta == 20000.0
    # a pattern of the wrong length is ignored for the default rule
    short = _parse(_gemma_meta(**{"gemma3.attention.sliding_window_pattern": [False]}), _llama_tensors(kv=1, hd=8, gemma=True))
    assert short.layer_types == ("sliding_attention", "sliding_attention")


def test_gemma3_27b_scales_by_hidden_over_heads() -> None:
    config = _parse(_gemma_meta(**{"gemma3.block_count": 62}), _llama_tensors(layers=62, kv=1, hd=8, gemma=True))
    assert config.query_pre_attn_scalar == D / HEADS and config.head_dim == 8
    assert config.layer_types.count("full_attention") == 10


@pytest.mark.parametrize("window", [None, 0, True, 8.0])
def test_gemma3_needs_a_positive_window(window: object) -> None:
    with pytest.raises(WeightsError) as err:
        _parse(_gemma_meta(**{"gemma3.attention.sliding_window": window}), _llama_tensors(kv=1, hd=8, gemma=True))
    assert str(err.value) == (f"m.gguf: GGUF metadata 'gemma3.attention.sliding_window' is {window!r}; expected a "
                              "positive integer (Gemma 3's local layers attend to that many tokens)")


def _nomic(layers: int = 1, types: int = 2) -> tuple[dict[str, Any], list[GGUFTensor]]:
    a = "nomic-bert"
    meta = {"general.architecture": a, "general.name": "nomic-embed-text-v1.5", f"{a}.embedding_length": D,
            f"{a}.attention.head_count": HEADS, f"{a}.block_count": layers, f"{a}.feed_forward_length": F,
            f"{a}.context_length": 64, f"{a}.attention.layer_norm_epsilon": 1e-12, f"{a}.rope.freq_base": 1000.0,
            "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tensors = [_tensor("token_embd.weight", (V, D)), _tensor("token_types.weight", (types, D)),
               _tensor("token_embd_norm.weight", (D,)), _tensor("token_embd_norm.bias", (D,))]
    for i in range(layers):
        b = f"blk.{i}."
        tensors += [_tensor(b + "attn_qkv.weight", (3 * D, D)), _tensor(b + "attn_output.weight", (D, D)),
                    _tensor(b + "ffn_up.weight", (F, D)), _tensor(b + "ffn_gate.weight", (F, D)),
                    _tensor(b + "ffn_down.weight", (D, F))]
        tensors += [_tensor(b + f"{n}.{p}", (D,)) for n in ("attn_output_norm", "layer_output_norm")
                    for p in ("weight", "bias")]
    return meta, tensors


def test_nomic_bert_is_a_normalised_mean_pooled_encoder() -> None:
    meta, tensors = _nomic()
    config = _parse(meta, tensors)
    assert config == ModelConfig(
        architecture="nomic_bert", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=HEADS,
        num_kv_heads=HEADS, head_dim=D // HEADS, max_position_embeddings=64, norm_eps=1e-12, rope_theta=1000.0,
        hidden_act="silu", type_vocab_size=2, pooling="mean", normalize_embeddings=True, prompts=NOMIC_PROMPTS,
        matryoshka=True, matryoshka_layer_norm=True, bos_token_id=1, eos_token_id=2, stored_dtype="F32 (13)",
        hf_model_type="nomic-bert", hf_architecture="NomicBertModel")
    assert config.is_encoder and config.prompts is not NOMIC_PROMPTS
    v1 = _parse({**meta, "general.name": "nomic-embed-text-v1", "nomic-bert.pooling_type": 2}, tensors)
    assert (v1.pooling, v1.matryoshka, v1.matryoshka_layer_norm) == ("cls", False, False)


def test_nomic_bert_errors() -> None:
    meta, tensors = _nomic()
    with pytest.raises(UnsupportedModelError) as err:
        _parse({**meta, "nomic-bert.pooling_type": 3}, tensors)
    assert str(err.value) == ("m.gguf: GGUF metadata 'nomic-bert.pooling_type' is 3; lmkernel pools by mean (1) or by "
                              "the first token (2)")
    with pytest.raises(WeightsError) as err:
        _parse({**meta, "nomic-bert.attention.head_count": 5}, tensors)
    assert str(err.value) == ("m.gguf: GGUF metadata gives embedding_length 16 and head_count 5; expected positive "
                              "sizes, the width a whole number of heads")
    qkv = [_tensor(t.name, (2 * D, D)) if t.name == "blk.0.attn_qkv.weight" else t for t in tensors]
    with pytest.raises(WeightsError) as err:
        _parse(meta, qkv)
    assert str(err.value) == "m.gguf: tensor 'blk.0.attn_qkv.weight' has shape [32, 16]; the metadata implies [48, 16]"


def test_nomic_bert_token_types_follow_the_table() -> None:
    meta, tensors = _nomic(types=1)
    assert _parse(meta, tensors).type_vocab_size == 1


def test_a_written_file_reads_back_through_the_real_reader(tmp_path: Path) -> None:
    """The same metadata written by gguf-py and read by lmkernel's reader gives the same config."""
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(2**-20)  # exact in the file's float32
    w.add_rope_freq_base(500000.0)
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for t in _llama_tensors(tied=False, bias=True):
        w.add_tensor(t.name, np.zeros(t.shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = GGUFFile(path)
    config = parse_config(path, reader, dict(reader.metadata))
    expected = _parse(_llama_meta("qwen2", **{"qwen2.attention.layer_norm_rms_epsilon": 2**-20}),
                      _llama_tensors(tied=False, bias=True))
    assert config == expected and config.stored_dtype == "F32 (27)"
