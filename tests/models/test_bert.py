"""BERT against the references: all-MiniLM-L6-v2 sentence embeddings versus sentence-transformers, and tiny
random masked-LM and classification checkpoints versus transformers (padded HF batch, our unpadded one)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten, load_dir, perturb_vectors, split


SEQS = [[101, 2054, 2003, 1996, 2907, 102], [101, 1632, 102], [101, *range(2000, 2030), 102]]
# Sentence pairs for the classifier: the second segment of each sequence has token type 1.
TYPES = [[0, 0, 0, 1, 1, 1], [0, 0, 1], [0] * 12 + [1] * 20]


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, **extra,
    )


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


@pytest.fixture(scope="module")
def minilm_model(minilm_dir):
    return load_dir(minilm_dir)


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    from transformers import BertForMaskedLM

    torch.manual_seed(3)
    model = perturb_vectors(BertForMaskedLM(_tiny_bert_config()), 0.1)
    directory = tmp_path_factory.mktemp("mlm")
    model.save_pretrained(directory, safe_serialization=True)
    return model, load_dir(directory)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import BertForSequenceClassification

    torch.manual_seed(4)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = _tiny_bert_config(id2label=labels, label2id={v: k for k, v in labels.items()})
    model = perturb_vectors(BertForSequenceClassification(config), 0.1)
    directory = tmp_path_factory.mktemp("cls")
    model.save_pretrained(directory, safe_serialization=True)
    return model, load_dir(directory)


def test_minilm_embeddings_match_sentence_transformers(minilm_model, st_minilm, hf_minilm_tokenizer, phrasebank_sentences):
    sentences = phrasebank_sentences[:100]
    config = minilm_model.config
    assert config.pooling == "mean" and config.normalize_embeddings and config.max_seq_length == 256
    encoded = hf_minilm_tokenizer(sentences, truncation=True, max_length=config.max_seq_length)
    ids, positions, meta = flatten(encoded["input_ids"], causal=False)
    types = torch.tensor([t for s in encoded["token_type_ids"] for t in s])
    with torch.no_grad():
        ours = minilm_model.pool(minilm_model(ids, positions, meta, types), meta)
    ref = st_minilm.encode(sentences, convert_to_tensor=True, normalize_embeddings=False).float()
    assert ours.shape == ref.shape == (100, 384)
    cosine = F.cosine_similarity(ours, ref, dim=-1)
    assert cosine.min().item() >= 0.9999, f"min cosine {cosine.min().item()}"
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(100), atol=1e-5, rtol=0)


def test_masked_lm_logits_match_transformers(tiny_mlm):
    ref_model, ours = tiny_mlm
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.no_grad():
        got = ours.mlm_logits(ours(ids, positions, meta))
        ref = ref_model(input_ids=padded, attention_mask=mask).logits
    assert got.shape == (sum(map(len, SEQS)), 3000)
    for i, (seq, part) in enumerate(zip(SEQS, split(got, meta))):
        torch.testing.assert_close(part, ref[i, : len(seq)], atol=1e-4, rtol=0)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_classifier_logits_match_transformers(tiny_classifier):
    ref_model, ours = tiny_classifier
    assert ours.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids, positions, meta = flatten(SEQS, causal=False)
    types = torch.tensor([t for s in TYPES for t in s])
    padded, mask = _padded(SEQS)
    padded_types, _ = _padded(TYPES)
    with torch.no_grad():
        got = ours.classify(ours(ids, positions, meta, types), meta)
        ref = ref_model(input_ids=padded, attention_mask=mask, token_type_ids=padded_types).logits
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cls_pooling_without_normalisation(tiny_mlm, tmp_path):
    """A bare BertModel checkpoint (no `bert.` prefix) in a sentence-transformers layout with CLS pooling."""
    ref_model, _ = tiny_mlm
    ref_model.bert.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    ours = load_dir(tmp_path)
    assert ours.config.pooling == "cls" and not ours.config.normalize_embeddings
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.no_grad():
        got = ours.pool(ours(ids, positions, meta), meta)
        ref = ref_model.bert(input_ids=padded, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_heads_absent_on_a_bare_encoder(minilm_model):
    assert minilm_model.cls is None and minilm_model.classifier is None
    hidden = torch.zeros(3, 384)
    meta = flatten([[1, 2, 3]], causal=False)[2]
    with pytest.raises(ValueError, match="no masked-LM head"):
        minilm_model.mlm_logits(hidden)
    with pytest.raises(ValueError, match="no classification head"):
        minilm_model.classify(hidden, meta)
