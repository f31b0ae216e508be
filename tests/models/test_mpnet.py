"""models/mpnet.py against transformers' MPNetModel and MPNetForSequenceClassification on a tiny random config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten, perturb_vectors, split

from lmkernel.config import ModelConfig
from lmkernel.models.mpnet import MPNetModel, relative_buckets
from lmkernel.models.weights import build_on_meta

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# Lengths past the 8 exact buckets and into the logarithmic ones; no token is the padding id 1.
SEQS = [[0, *range(10, 48), 2], [0, 5, 2], [0, *range(100, 115), 2]]


def _hf_config(**extra):
    """Weights of std 0.2, not 0.02: attention sharp enough that where each position sits counts."""

    from transformers import MPNetConfig

    return MPNetConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       max_position_embeddings=66, initializer_range=0.2, **extra)


def _ours(reference, **changes) -> MPNetModel:
    """Our MPNetModel with transformers' tensors, the config written out from theirs by hand."""
    c = reference.config
    config = ModelConfig("mpnet", c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                         c.num_attention_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads,
                         c.max_position_embeddings - 2, norm_eps=c.layer_norm_eps, hidden_act="gelu", pad_token_id=1,
                         id2label=dict(c.id2label) if "Classification" in type(reference).__name__ else {},
                         hf_model_type="mpnet", hf_architecture=type(reference).__name__)
    model = build_on_meta(MPNetModel, dataclasses.replace(config, **changes))
    model.load_weights(reference.state_dict(), "reference")
    return model.eval()


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    return (torch.tensor([s + [1] * (width - len(s)) for s in seqs]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]))


@pytest.fixture(scope="module")
def bare():
    from transformers import MPNetModel as HFMPNetModel

    torch.manual_seed(0)
    return perturb_vectors(HFMPNetModel(_hf_config()), 0.3)


def test_relative_buckets_by_hand_and_as_transformers_computes_them():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    b = relative_buckets(200, torch.device("cpu"))
    # (query i, key j): keys after the query take buckets 16-31; exact below 8, log up to 128, then the last one
    expected = {(0, 0): 0, (1, 0): 1, (0, 1): 17, (7, 0): 7, (0, 7): 23, (8, 0): 8, (16, 0): 10, (32, 0): 12,
                (127, 0): 15, (199, 0): 15, (0, 199): 31}
    assert {ij: int(b[ij]) for ij in expected} == expected
    distance = torch.arange(200)[None, :] - torch.arange(200)[:, None]
    assert torch.equal(b, MPNetEncoder.relative_position_bucket(distance))


def test_hidden_states_match_transformers_on_a_padded_batch(bare):
    ours = _ours(bare)
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.inference_mode():
        expected = bare(input_ids=padded, attention_mask=mask).last_hidden_state
        hidden = ours(ids, positions, meta)
    assert hidden.shape == (sum(map(len, SEQS)), 32)
    for i, got in enumerate(split(hidden, meta)):
        torch.testing.assert_close(got, expected[i, : len(SEQS[i])], atol=1e-5, rtol=1e-4)


def test_pool_is_the_mean_normalised_or_the_first_token_as_configured(bare):
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.inference_mode():
        expected = bare(input_ids=padded, attention_mask=mask).last_hidden_state
        mean = ((expected * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        normalised = _ours(bare, normalize_embeddings=True)
        first = _ours(bare, pooling="cls")
        got_mean = normalised.pool(normalised(ids, positions, meta), meta)
        got_first = first.pool(first(ids, positions, meta), meta)
    torch.testing.assert_close(got_mean, F.normalize(mean, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_first, expected[:, 0], atol=1e-5, rtol=1e-4)
    assert got_first.norm(dim=-1).sub(1).abs().min() > 1e-2  # not normalised unless configured


def test_classifier_under_mpnet_prefix_gives_transformers_logits_and_names():
    from transformers import MPNetForSequenceClassification

    torch.manual_seed(1)
    reference = perturb_vectors(MPNetForSequenceClassification(
        _hf_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})), 0.3)
    assert any(k.startswith("mpnet.") for k in reference.state_dict())
    ours = _ours(reference)
    ids, positions, meta = flatten(SEQS, causal=False)
    padded, mask = _padded(SEQS)
    with torch.inference_mode():
        expected = reference(input_ids=padded, attention_mask=mask).logits
        got = ours.classify(ours(ids, positions, meta), meta)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    named = ours.hf_tensors(ours.state_dict())
    theirs = reference.state_dict()
    assert named.keys() == theirs.keys()
    assert all(torch.equal(named[k], theirs[k]) for k in theirs)


def test_bare_model_keeps_transformers_names_and_has_no_classifier(bare):
    ours = _ours(bare)
    named = ours.hf_tensors(ours.state_dict())
    assert named.keys() == {k for k in bare.state_dict() if not k.startswith("pooler.")}  # the pooler is not used
    ids, positions, meta = flatten(SEQS, causal=False)
    with pytest.raises(ValueError, match="no classification head \\(architecture 'MPNetModel'\\)"):
        ours.classify(ours(ids, positions, meta), meta)
