"""The heads a training task adds: the new model's architecture and config, the base tensors kept, the head's
tensors drawn as transformers draws them (normal, std 0.02, from the seed; biases zero), and what counts as new."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkernel.config import ModelConfig
from lmkernel.models import model_class
from lmkernel.train.heads import (INIT_STD, bert_classifier_head, decoder_classifier_head, encoder_classifier_head,
                                  init_linear, mlm_head)

H, V = 16, 50
LABELS = {0: "neg", 1: "neu", 2: "pos"}
CONFIGS = {
    "bert": ModelConfig("bert", V, H, 32, 1, 2, 2, 8, 32, type_vocab_size=2, hidden_act="gelu",
                        hf_architecture="BertModel", hf_model_type="bert"),
    "mpnet": ModelConfig("mpnet", V, H, 32, 1, 2, 2, 8, 34, hidden_act="gelu", hf_architecture="MPNetModel",
                         hf_model_type="mpnet"),
    "nomic_bert": ModelConfig("nomic_bert", V, H, 32, 1, 2, 2, 8, 32, type_vocab_size=2,
                              hf_architecture="NomicBertModel", hf_model_type="nomic-bert"),
    "gemma3": ModelConfig("gemma3", V, H, 32, 1, 2, 1, 8, 32, bidirectional=True, hidden_act="gelu_pytorch_tanh",
                          sliding_window=4, hf_architecture="Gemma3TextModel", hf_model_type="gemma3_text"),
    "llama": ModelConfig("llama", V, H, 32, 1, 2, 1, 8, 32, hf_architecture="LlamaForCausalLM", hf_model_type="llama"),
}


def _random_model(name: str, **changes: object) -> tuple[torch.nn.Module, ModelConfig]:
    config = dataclasses.replace(CONFIGS[name], **changes)
    model = model_class(config)(config)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, config


def _normal(seed: int, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    """The seed's generator drawing each shape in turn, as transformers initialises a linear weight."""
    g = torch.Generator().manual_seed(seed)
    return [torch.empty(s).normal_(0.0, INIT_STD, generator=g) for s in shapes]


def _kept(base: torch.nn.Module, new: torch.nn.Module, prefix: str = "") -> None:
    old, now = base.state_dict(), new.state_dict()
    for k, v in old.items():
        assert torch.equal(now[prefix + k], v), k


def test_init_linear_is_seeded_normal_with_zero_bias() -> None:
    layer = torch.nn.Linear(6, 4)
    first = init_linear(layer, torch.Generator().manual_seed(5))
    assert torch.equal(first["weight"], _normal(5, (4, 6))[0]) and torch.equal(first["bias"], torch.zeros(4))
    assert not torch.equal(init_linear(layer, torch.Generator().manual_seed(6))["weight"], first["weight"])
    big = init_linear(torch.nn.Linear(400, 300), torch.Generator().manual_seed(0))["weight"]
    assert float(big.mean()) == pytest.approx(0.0, abs=5e-4) and float(big.std()) == pytest.approx(INIT_STD, rel=0.02)


def test_mlm_head_ties_the_decoder_and_starts_the_transform_as_transformers_does() -> None:
    model, config = _random_model("bert")
    new, new_config, created = mlm_head(model, config, seed=3)
    assert created == ["cls.predictions.transform"]
    assert (new_config.hf_architecture, new_config.tie_word_embeddings) == ("BertForMaskedLM", True)
    _kept(model, new)
    p = new.cls.predictions
    assert torch.equal(p.transform.dense.weight, _normal(3, (H, H))[0])
    assert torch.equal(p.transform.dense.bias, torch.zeros(H))
    assert torch.equal(p.transform.LayerNorm.weight, torch.ones(H)) and torch.equal(p.transform.LayerNorm.bias, torch.zeros(H))
    assert torch.equal(p.bias, torch.zeros(V))
    assert torch.equal(p.decoder.weight, model.bert.embeddings.word_embeddings.weight)  # tied to the input table
    hidden = torch.randn(3, H)
    with torch.no_grad():
        expected = p.transform.LayerNorm(torch.nn.functional.gelu(hidden @ p.transform.dense.weight.T)) @ \
            model.bert.embeddings.word_embeddings.weight.T
        torch.testing.assert_close(new.mlm_logits(hidden), expected)


def test_bert_classifier_takes_the_checkpoints_pooler() -> None:
    model, config = _random_model("bert")
    pooler = {"bert.pooler.dense.weight": torch.randn(H, H), "pooler.dense.bias": torch.randn(H)}  # both namings
    new, new_config, created = bert_classifier_head(model, config, LABELS, seed=1, checkpoint=lambda: pooler)
    assert created == ["classifier"]
    assert (new_config.hf_architecture, new_config.id2label) == ("BertForSequenceClassification", LABELS)
    _kept(model, new)
    assert torch.equal(new.bert.pooler.dense.weight, pooler["bert.pooler.dense.weight"])
    assert torch.equal(new.bert.pooler.dense.bias, pooler["pooler.dense.bias"])
    assert torch.equal(new.classifier.weight, _normal(1, (3, H))[0]) and torch.equal(new.classifier.bias, torch.zeros(3))


def test_bert_classifier_without_a_pooler_in_the_checkpoint_starts_one() -> None:
    model, config = _random_model("bert")
    partial = {"pooler.dense.weight": torch.randn(H, H), "encoder.x": torch.randn(1)}  # no bias: not a pooler
    new, _, created = bert_classifier_head(model, config, LABELS, seed=2, checkpoint=lambda: partial)
    assert created == ["classifier", "bert.pooler"]
    classifier, pooler = _normal(2, (3, H), (H, H))  # drawn in this order from the one generator
    assert torch.equal(new.classifier.weight, classifier) and torch.equal(new.bert.pooler.dense.weight, pooler)
    assert torch.equal(new.bert.pooler.dense.bias, torch.zeros(H))


def test_bert_classifier_on_a_model_with_a_pooler_keeps_it_and_replaces_the_classifier() -> None:
    model, config = _random_model("bert", hf_architecture="BertForSequenceClassification", id2label={0: "a", 1: "b"})
    calls = []
    new, new_config, created = bert_classifier_head(model, config, LABELS, seed=4, checkpoint=lambda: calls.append(1) or {})
    assert created == ["classifier"] and calls == []  # the checkpoint is not read
    assert new_config.id2label == LABELS and new.classifier.weight.shape == (3, H)
    assert torch.equal(new.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    assert torch.equal(new.classifier.weight, _normal(4, (3, H))[0])


def test_mpnet_classifier_is_dense_then_out_proj() -> None:
    model, config = _random_model("mpnet")
    new, new_config, created = encoder_classifier_head(model, config, LABELS, seed=7)
    assert created == ["classifier"] and new_config.hf_architecture == "MPNetForSequenceClassification"
    _kept(model, new)
    dense, out = _normal(7, (H, H), (3, H))
    assert torch.equal(new.classifier.dense.weight, dense) and torch.equal(new.classifier.out_proj.weight, out)
    assert torch.equal(new.classifier.out_proj.bias, torch.zeros(3))


def test_nomic_classifier_starts_its_pooler_and_classifier() -> None:
    model, config = _random_model("nomic_bert")
    new, new_config, created = encoder_classifier_head(model, config, LABELS, seed=8)
    assert created == ["pooler", "classifier"] and new_config.hf_architecture == "NomicBertForSequenceClassification"
    _kept(model, new)
    pooler, classifier = _normal(8, (H, H), (3, H))
    assert torch.equal(new.pooler.weight, pooler) and torch.equal(new.classifier.weight, classifier)


def test_gemma3_encoder_gets_a_score_layer() -> None:
    model, config = _random_model("gemma3")
    new, new_config, created = encoder_classifier_head(model, config, LABELS, seed=9)
    assert created == ["score"] and new_config.hf_architecture == "Gemma3TextForSequenceClassification"
    _kept(model, new)
    expected = torch.randn(3, H, generator=torch.Generator().manual_seed(9)) * INIT_STD
    assert torch.equal(new.score.weight, expected) and new.score.bias is None


@pytest.mark.parametrize(("model_type", "family"), [("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"),
                                                    ("smollm", "Llama")])
def test_decoder_classifier_scores_the_last_token(model_type: str, family: str) -> None:
    model, config = _random_model("llama", hf_model_type=model_type)
    new, new_config, created = decoder_classifier_head(model, config, LABELS, seed=10)
    assert created == ["score"]
    assert (new_config.hf_architecture, new_config.id2label) == (f"{family}ForSequenceClassification", LABELS)
    assert new_config.is_classifier
    expected = torch.randn(3, H, generator=torch.Generator().manual_seed(10)) * 0.02
    assert torch.equal(new.score.weight, expected) and new.score.bias is None
    kept = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    now = new.state_dict()
    assert all(torch.equal(now[k], v) for k, v in kept.items())
