"""GPT-2 against transformers: a tiny random checkpoint saved by transformers, same logits through lmkernel."""

from __future__ import annotations

import pytest
import torch
from flat_batch import add_tokenizer, flatten, split

from lmkernel import load_model

SEQS = [[5, 17, 300, 999, 42, 7, 7, 8], [1, 2, 3], list(range(100, 140))]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, minilm_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return model, load_model(add_tokenizer(directory, minilm_dir))


def test_logits_match_transformers(tiny_gpt2):
    ref_model, ours = tiny_gpt2
    assert ours.config.architecture == "gpt2" and ours.config.tie_word_embeddings
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        flat = ours.model.compute_logits(ours.model(ids, positions, meta))
        for seq, got in zip(SEQS, split(flat, meta)):
            ref = ref_model(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.logits(seq), ref, atol=1e-4, rtol=0)


def test_head_is_tied_to_token_embeddings(tiny_gpt2):
    _, ours = tiny_gpt2
    assert ours.model.lm_head.weight is ours.model.transformer.wte.weight
