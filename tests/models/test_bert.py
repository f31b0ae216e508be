"""BERT heads against transformers: tiny random masked-LM and classification checkpoints, padded HF batch
versus lmkernel's unpadded one. (Sentence embeddings of the real MiniLM are checked in tests/test_loading.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from flat_batch import add_tokenizer, flatten, split

from lmkernel import load_model

SEQS = [[101, 2054, 2003, 1996, 2907, 102], [101, 1632, 102], [101, *range(2000, 2030), 102]]


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, **extra,
    )


def _padded(seqs):
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory, minilm_dir):
    from transformers import BertForMaskedLM

    torch.manual_seed(3)
    model = BertForMaskedLM(_tiny_bert_config()).eval()
    directory = tmp_path_factory.mktemp("mlm")
    model.save_pretrained(directory)
    return model, load_model(add_tokenizer(directory, minilm_dir))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, minilm_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(4)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = _tiny_bert_config(id2label=labels, label2id={v: k for k, v in labels.items()})
    model = BertForSequenceClassification(config).eval()
    directory = tmp_path_factory.mktemp("cls")
    model.save_pretrained(directory)
    return model, load_model(add_tokenizer(directory, minilm_dir))


def test_masked_lm_logits_match_transformers(tiny_mlm):
    ref_model, ours = tiny_mlm
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.no_grad():
        got = ours.model.mlm_logits(ours.model(ids, positions, meta))
        ref = ref_model(input_ids=padded, attention_mask=mask).logits
    for i, (seq, part) in enumerate(zip(SEQS, split(got, meta))):
        torch.testing.assert_close(part, ref[i, : len(seq)], atol=1e-4, rtol=0)
    assert ours.model.cls.predictions.decoder.weight is ours.model.bert.embeddings.word_embeddings.weight


def test_classifier_logits_match_transformers(tiny_classifier):
    ref_model, ours = tiny_classifier
    assert ours.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.no_grad():
        got = ours.model.classify(ours.model(ids, positions, meta), meta)
        ref = ref_model(input_ids=padded, attention_mask=mask).logits
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cls_pooling_without_normalisation(tiny_mlm, tmp_path, minilm_dir):
    """A sentence-transformers layout asking for CLS pooling and no Normalize module."""
    ref_model, _ = tiny_mlm
    ref_model.bert.save_pretrained(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    ours = load_model(add_tokenizer(tmp_path, minilm_dir))
    assert ours.config.pooling == "cls" and not ours.config.normalize_embeddings
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.no_grad():
        got = ours.model.pool(ours.model(ids, positions, meta), meta)
        ref = ref_model.bert(input_ids=padded, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_heads_absent_on_a_bare_encoder(minilm):
    hidden = torch.zeros(3, 384)
    with pytest.raises(ValueError, match="no masked-LM head"):
        minilm.model.mlm_logits(hidden)
