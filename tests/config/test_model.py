"""ModelConfig's derived properties: encoder / classifier, windows per layer, context and end-of-sequence ids."""

from __future__ import annotations

import dataclasses

import pytest

from lmkernel.config import ENCODER_ARCHITECTURES, ModelConfig

BASE = ModelConfig("llama", 100, 16, 32, 4, 2, 1, 8, max_position_embeddings=512)


def _with(**changes: object) -> ModelConfig:
    return dataclasses.replace(BASE, **changes)


@pytest.mark.parametrize(("changes", "encoder"), [
    ({}, False), ({"architecture": "gemma3"}, False), ({"architecture": "gpt2"}, False),
    ({"architecture": "bert"}, True), ({"architecture": "mpnet"}, True), ({"architecture": "nomic_bert"}, True),
    ({"architecture": "gemma3", "bidirectional": True}, True),  # EmbeddingGemma
])
def test_is_encoder(changes: dict, encoder: bool) -> None:
    assert _with(**changes).is_encoder is encoder
    assert ENCODER_ARCHITECTURES == ("bert", "mpnet", "nomic_bert")


@pytest.mark.parametrize(("arch", "classifier"), [
    ("", False), ("LlamaForCausalLM", False), ("BertForSequenceClassification", True),
    ("Qwen2ForSequenceClassification", True), ("BertForTokenClassification", False), ("BertModel", False),
])
def test_is_classifier_is_a_sequence_classification_head(arch: str, classifier: bool) -> None:
    assert _with(hf_architecture=arch).is_classifier is classifier


def test_window_without_layer_types_slides_every_layer() -> None:
    assert [BASE.window(i) for i in range(4)] == [None] * 4
    mistral = _with(sliding_window=4096)
    assert [mistral.window(i) for i in range(4)] == [4096] * 4


def test_window_with_layer_types_slides_only_the_sliding_layers() -> None:
    types = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    gemma = _with(sliding_window=512, layer_types=types)
    assert [gemma.window(i) for i in range(4)] == [512, None, 512, None]
    assert [_with(layer_types=types).window(i) for i in range(4)] == [None] * 4  # no window: all full


@pytest.mark.parametrize(("changes", "valid"), [
    ({}, True), ({"sliding_window": 1}, True), ({"sliding_window": 4096, "rope_local_theta": 10000.0}, True),
    ({"sliding_window": 0}, False), ({"sliding_window": -3}, False), ({"sliding_window": True}, False),
    ({"sliding_window": 2.5}, False), ({"rope_local_theta": 0.0}, False), ({"rope_local_theta": -1.0}, False),
    ({"layer_types": ("full_attention",) * 4}, True), ({"layer_types": ("full_attention",) * 3}, False),
])
def test_window_is_valid(changes: dict, valid: bool) -> None:
    assert _with(**changes).window_is_valid is valid


def test_context_is_the_trained_positions_and_its_reason_says_so() -> None:
    assert BASE.max_context == 512
    assert BASE.context_limit_reason == "the model's context length of 512 tokens"
    assert _with(sliding_window=64).max_context == 512


@pytest.mark.parametrize(("eos", "ids"), [(None, []), (2, [2]), (0, [0]), ([2, 7], [2, 7]), ((5,), [5])])
def test_eos_token_ids_are_a_list_whatever_the_form(eos: object, ids: list[int]) -> None:
    got = _with(eos_token_id=eos).eos_token_ids
    assert got == ids and type(got) is list


def test_eos_token_ids_is_a_copy() -> None:
    ids = [1, 2]
    config = _with(eos_token_id=ids)
    config.eos_token_ids.append(3)
    assert config.eos_token_ids == [1, 2]


def test_defaults_are_a_plain_llama_decoder() -> None:
    assert (BASE.norm_eps, BASE.hidden_act, BASE.rope_theta, BASE.rope_scaling, BASE.tie_word_embeddings,
            BASE.pooling, BASE.layer_types, BASE.prompts, BASE.id2label) == (1e-5, "silu", 10000.0, None, False,
                                                                             "mean", (), {}, {})
    other = ModelConfig("llama", 100, 16, 32, 4, 2, 1, 8, max_position_embeddings=512)
    assert other.prompts is not BASE.prompts and other.id2label is not BASE.id2label  # each instance its own dicts
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.vocab_size = 3  # type: ignore[misc]
