"""Every encoder run in pieces (embeddings, the first k layers, the rest, then what follows the last) gives its
forward's states: the recommender trains the top layers on states the bottom ones computed once."""

from __future__ import annotations

import pytest
import torch
from model_checks import flatten, load_dir, perturb_vectors

from lmkernel.models.encoder_stack import run_stack

SEQS = [[0, *range(10, 38), 2], [0, 5, 9, 2], [0, *range(100, 117), 2]]


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64), add_pooling_layer=False)


def _mpnet():
    from transformers import MPNetConfig, MPNetModel

    return MPNetModel(MPNetConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=66), add_pooling_layer=False)


def _gemma():
    from transformers import Gemma3TextConfig, Gemma3TextModel

    return Gemma3TextModel(Gemma3TextConfig(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], use_bidirectional_attention=True))


@pytest.mark.parametrize("make", [_bert, _mpnet, _gemma], ids=["bert", "mpnet", "gemma3"])
def test_pieces_give_the_whole(tmp_path, make):
    torch.manual_seed(0)
    reference = perturb_vectors(make(), 0.3)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_dir(tmp_path)
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        whole = ours(ids, positions, meta)
        last = reference(torch.tensor([SEQS[0]])).last_hidden_state[0]
        torch.testing.assert_close(whole[: len(SEQS[0])], last, atol=1e-5, rtol=1e-4)  # the whole is transformers'
        for k in range(len(ours.stack) + 1):
            bottom = run_stack(ours, ours.embed_tokens(ids, positions), positions, meta, 0, k)
            torch.testing.assert_close(ours.finish(run_stack(ours, bottom, positions, meta, k)), whole)
        bottom = run_stack(ours, ours.embed_tokens(ids, positions), positions, meta, 0, 1)
        assert (ours.finish(run_stack(ours, bottom, positions, meta, 2)) - whole).abs().max() > 1e-3  # a layer skipped
