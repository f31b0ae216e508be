"""Classifiers on the newer encoders, against transformers on tiny random checkpoints: MPNet's and nomic-bert's
heads on the first token, Gemma3TextForSequenceClassification's `score` on the last (bidirectional, as EmbeddingGemma), each read
from transformers' own save, written back by lmkernel and read again by transformers with the same logits. An
EmbeddingGemma-style folder keeps its Dense modules and prompts through the round trip."""

from __future__ import annotations

import json

import pytest
import torch
from model_checks import flatten, load_dir, perturb_vectors
from safetensors.torch import save_file

from lmkernel.errors import LmkError
from lmkernel.loader.hf_export import hf_config, save_model_dir
from lmkernel.loader.tokenizer import Tokenizer

SEQS = [[0, *range(10, 38), 2], [0, 5, 9, 2], [0, *range(100, 117), 2]]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_hf_dir(minilm_dir)


def _mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=66, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return perturb_vectors(MPNetForSequenceClassification(config), 0.3)


def _gemma():
    from transformers import Gemma3TextConfig, Gemma3TextForSequenceClassification

    torch.manual_seed(1)
    config = Gemma3TextConfig(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        use_bidirectional_attention=True, pad_token_id=1, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return perturb_vectors(Gemma3TextForSequenceClassification(config), 0.3)


def _nomic():
    from transformers import NomicBertConfig, NomicBertForSequenceClassification

    torch.manual_seed(2)
    config = NomicBertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, id2label=LABELS,
                             label2id={v: k for k, v in LABELS.items()})
    return perturb_vectors(NomicBertForSequenceClassification(config), 0.3)


def _theirs(model, seqs) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([s])).logits for s in seqs])


def _ours(model, seqs) -> torch.Tensor:
    ids, positions, meta = flatten(seqs, causal=False)
    with torch.inference_mode():
        return model.classify(model(ids, positions, meta), meta)


@pytest.mark.parametrize("make", [_mpnet, _nomic, _gemma], ids=["mpnet", "nomic_bert", "gemma3"])
def test_a_classifier_reads_and_writes_as_transformers_does(tmp_path, tokenizer, make):
    from transformers import AutoModelForSequenceClassification

    reference = make().eval()
    reference.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    ours = load_dir(tmp_path / "theirs")
    assert ours.config.is_classifier and ours.config.is_encoder and ours.config.id2label == LABELS
    expected = _theirs(reference, SEQS)
    torch.testing.assert_close(_ours(ours, SEQS), expected, atol=1e-5, rtol=1e-4)

    save_model_dir(ours, ours.config, tokenizer, torch.float32, tmp_path / "ours")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(again) is type(reference) and again.config.id2label == LABELS
    torch.testing.assert_close(_theirs(again, SEQS), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_ours(load_dir(tmp_path / "ours"), SEQS), expected, atol=1e-5, rtol=1e-4)


def test_an_embeddinggemma_folder_keeps_its_dense_modules_and_prompts(tmp_path, tokenizer):
    from transformers import Gemma3TextModel

    reference = _gemma()
    bare = Gemma3TextModel(reference.config)
    bare.load_state_dict(reference.model.state_dict())
    bare.config.architectures = ["Gemma3TextModel"]
    bare.save_pretrained(tmp_path / "st", safe_serialization=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (tmp_path / "st" / "2_Dense").mkdir()
    save_file({"linear.weight": torch.randn(48, 64) * 0.1}, tmp_path / "st" / "2_Dense" / "model.safetensors")
    (tmp_path / "st" / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 64, "out_features": 48, "bias": False, "activation_function": "torch.nn.modules.linear.Identity"}))
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "st" / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "q: "}}))
    ours = load_dir(tmp_path / "st")
    save_model_dir(ours, ours.config, tokenizer, torch.float32, tmp_path / "again")
    again = load_dir(tmp_path / "again")
    assert again.config.sentence_dense == ours.config.sentence_dense == ((64, 48, False, "identity"),)
    assert again.config.prompts == {"query": "q: "} and again.config.sliding_window == ours.config.sliding_window
    assert json.loads((tmp_path / "again" / "config.json").read_text())["sliding_window"] == 8
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        torch.testing.assert_close(again.pool(again(ids, positions, meta), meta), ours.pool(ours(ids, positions, meta), meta))


def test_a_tiny_embeddinggemma_trains_to_a_classifier_transformers_reads(tmp_path, minilm_dir) -> None:
    """`lmk train --task classify` on a bidirectional Gemma 3 encoder (MiniLM's tokenizer beside it): two steps,
    then transformers' Gemma3TextForSequenceClassification gives lmkernel's logits."""
    import shutil

    from transformers import AutoModelForSequenceClassification, Gemma3TextConfig, Gemma3TextModel

    from lmkernel.loading import load_model
    from lmkernel.train.args import TrainArgs
    from lmkernel.train.checkpoint import model_dir
    from lmkernel.train.trainer import train
    from shared_paths import SHARED_DATA

    torch.manual_seed(3)
    config = Gemma3TextConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True, pad_token_id=0)
    Gemma3TextModel(config).save_pretrained(tmp_path / "tiny", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir / name, tmp_path / "tiny" / name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join((SHARED_DATA / "financial-phrasebank" / "train.jsonl").read_text().splitlines(True)[:24]))
    args = TrainArgs(task="classify", model=str(tmp_path / "tiny"), data=str(data), eval_data=str(data),
                     output=str(tmp_path / "run"), max_steps=2, batch_size=8, lr=1e-3, warmup=0, checkpointing=False)
    assert train(args).steps == 2
    saved = model_dir(tmp_path / "run")
    ours = load_model(saved)
    assert ours.config.hf_architecture == "Gemma3TextForSequenceClassification" and ours.config.is_encoder
    theirs = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    torch.testing.assert_close(_ours(ours.model, SEQS), _theirs(theirs, SEQS), atol=1e-5, rtol=1e-4)


def test_a_model_lmkernel_cannot_write_is_named() -> None:
    from lmkernel.config import ModelConfig

    config = ModelConfig(architecture="gemma3", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=4, max_position_embeddings=16)
    with pytest.raises(LmkError, match="a gemma3 model cannot be saved as a Hugging Face directory"):
        hf_config(config, torch.float32)
