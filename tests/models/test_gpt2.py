"""GPT-2 against transformers: a tiny random checkpoint saved by transformers, same logits through lmkernel."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from model_checks import flatten, load_dir, perturb_vectors, split

from lmkernel.errors import UnsupportedModelError
from lmkernel.loader.hf_config import parse_config
from lmkernel.models import model_class

SEQS = [[5, 17, 300, 999, 42, 7, 7, 8], [1, 2, 3], list(range(100, 140))]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
    model = perturb_vectors(GPT2LMHeadModel(config), 0.1)
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory, load_dir(directory)


def test_logits_match_transformers(tiny_gpt2):
    ref_model, _, ours = tiny_gpt2
    assert ours.config.architecture == "gpt2" and ours.config.tie_word_embeddings
    assert all(p.device.type == "cpu" for p in ours.parameters())
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        flat = ours.compute_logits(ours(ids, positions, meta))
        assert flat.shape == (sum(map(len, SEQS)), 1000)
        for seq, got in zip(SEQS, split(flat, meta)):
            torch.testing.assert_close(got, ref_model(torch.tensor([seq])).logits[0], atol=1e-4, rtol=0)


def test_head_is_tied_to_token_embeddings(tiny_gpt2):
    _, _, ours = tiny_gpt2
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_bare_gpt2model_checkpoint_loads(tiny_gpt2, tmp_path):
    """A checkpoint of GPT2Model alone names its tensors without the `transformer.` prefix."""
    ref_model, _, _ = tiny_gpt2
    ref_model.transformer.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_dir(tmp_path)
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        flat = ours(ids, positions, meta)
        for seq, got in zip(SEQS, split(flat, meta)):
            ref = ref_model.transformer(torch.tensor([seq])).last_hidden_state[0]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_unknown_architecture_names_the_supported_ones(tiny_gpt2):
    _, directory, _ = tiny_gpt2
    config = replace(parse_config(directory), architecture="mamba")
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*\['bert', 'gemma3', 'gemma3_encoder', 'gpt2', 'llama', 'mpnet', 'nomic_bert'\]"):
        model_class(config)
