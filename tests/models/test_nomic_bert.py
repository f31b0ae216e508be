"""models/nomic_bert.py against transformers' NomicBertModel / NomicBertForSequenceClassification on a tiny random
config, read in transformers' names and in nomic's own (Wqkv, fc11/fc12, norm1/norm2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten, perturb_vectors, split

from lmkernel.config import ModelConfig
from lmkernel.models.nomic_bert import NomicBertModel
from lmkernel.models.weights import build_on_meta

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
SEQS = [[1, *range(10, 40), 2], [1, 5, 2], [1, *range(100, 113), 2]]
TYPES = [[0] * 20 + [1] * 12, [0, 0, 1], [0] * 15]


def _hf_config(**extra):
    """Weights of std 0.2, not 0.02: attention sharp enough that where each position sits counts."""

    from transformers import NomicBertConfig

    return NomicBertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, initializer_range=0.2, **extra)


def _ours(reference, tensors=None, **changes) -> NomicBertModel:
    """Our NomicBertModel with the reference's tensors (or `tensors`), the config written out from theirs by hand."""
    c = reference.config
    head = "Classification" in type(reference).__name__
    config = ModelConfig("nomic_bert", c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                         c.num_attention_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads,
                         c.max_position_embeddings, norm_eps=c.layer_norm_eps, rope_theta=1000.0, type_vocab_size=2,
                         id2label=dict(c.id2label) if head else {}, hf_model_type="nomic_bert",
                         hf_architecture=type(reference).__name__)
    model = build_on_meta(NomicBertModel, dataclasses.replace(config, **changes))
    model.load_weights(reference.state_dict() if tensors is None else tensors, "reference")
    return model.eval()


def _nomic_names(theirs: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' tensors under the names of nomic's own checkpoint (nomic-ai/nomic-embed-text-v1.5)."""
    out = {"embeddings.word_embeddings.weight": theirs["embeddings.word_embeddings.weight"],
           "embeddings.token_type_embeddings.weight": theirs["embeddings.token_type_embeddings.weight"],
           "emb_ln.weight": theirs["embeddings.LayerNorm.weight"], "emb_ln.bias": theirs["embeddings.LayerNorm.bias"]}
    for i in range(layers):
        a, b = f"layers.{i}.", f"encoder.layers.{i}."
        out[b + "attn.Wqkv.weight"] = torch.cat([theirs[f"{a}self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.out_proj.weight"] = theirs[a + "self_attn.o_proj.weight"]
        out[b + "mlp.fc11.weight"] = theirs[a + "mlp.up_proj.weight"]
        out[b + "mlp.fc12.weight"] = theirs[a + "mlp.gate_proj.weight"]
        out[b + "mlp.fc2.weight"] = theirs[a + "mlp.down_proj.weight"]
        for ours, hf in (("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")):
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = theirs[f"{a}{hf}.weight"], theirs[f"{a}{hf}.bias"]
    return out


def _padded(seqs: list[list[int]], fill: int = 0) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [fill] * (width - len(s)) for s in seqs])


@pytest.fixture(scope="module")
def bare():
    from transformers import NomicBertModel as HFNomicBertModel

    torch.manual_seed(0)
    return perturb_vectors(HFNomicBertModel(_hf_config()), 0.3)


@pytest.fixture(scope="module")
def expected(bare) -> torch.Tensor:
    """transformers' last hidden states of SEQS with TYPES, right-padded with a mask [B, T, hidden]."""
    mask = _padded([[1] * len(s) for s in SEQS])
    with torch.inference_mode():
        return bare(input_ids=_padded(SEQS), attention_mask=mask, token_type_ids=_padded(TYPES)).last_hidden_state


def _hidden(model: NomicBertModel, types: bool = True) -> list[torch.Tensor]:
    ids, positions, meta = flatten(SEQS, causal=False)
    token_types = torch.tensor([t for s in TYPES for t in s]) if types else None
    with torch.inference_mode():
        return split(model(ids, positions, meta, token_types), meta)


def test_hidden_states_match_transformers_in_either_naming(bare, expected):
    """Rotary on q and k, SwiGLU, post-norm and token types: transformers' states, loaded from its names or nomic's."""
    for model in (_ours(bare), _ours(bare, _nomic_names(bare.state_dict(), 2))):
        for i, got in enumerate(_hidden(model)):
            torch.testing.assert_close(got, expected[i, : len(SEQS[i])], atol=1e-5, rtol=1e-4)


def test_token_types_default_to_zero(bare):
    with torch.inference_mode():
        zeros = bare(input_ids=_padded(SEQS), attention_mask=_padded([[1] * len(s) for s in SEQS])).last_hidden_state
    for i, got in enumerate(_hidden(_ours(bare), types=False)):
        torch.testing.assert_close(got, zeros[i, : len(SEQS[i])], atol=1e-5, rtol=1e-4)


def test_pool_is_the_normalised_mean_of_each_sequence(bare, expected):
    ours = _ours(bare, normalize_embeddings=True)
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        pooled = ours.pool(ours(ids, positions, meta, torch.tensor([t for s in TYPES for t in s])), meta)
    mean = torch.stack([expected[i, : len(s)].mean(0) for i, s in enumerate(SEQS)])
    torch.testing.assert_close(pooled, F.normalize(mean, dim=-1), atol=1e-5, rtol=1e-4)
    raw = _ours(bare, normalize_embeddings=False)
    with torch.inference_mode():
        torch.testing.assert_close(raw.pool(raw(ids, positions, meta, torch.tensor([t for s in TYPES for t in s])), meta),
                                   mean, atol=1e-5, rtol=1e-4)


def test_hf_tensors_are_transformers_own_names_and_values(bare):
    ours = _ours(bare, _nomic_names(bare.state_dict(), 2))
    named = ours.hf_tensors(ours.state_dict())
    theirs = bare.state_dict()
    assert named.keys() == theirs.keys()
    assert all(torch.equal(named[k], theirs[k]) for k in theirs)


def test_classifier_gives_transformers_logits_through_the_pooler():
    from transformers import NomicBertForSequenceClassification

    torch.manual_seed(2)
    reference = perturb_vectors(NomicBertForSequenceClassification(
        _hf_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})), 0.3).eval()
    ours = _ours(reference)
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        expected = reference(input_ids=_padded(SEQS), attention_mask=_padded([[1] * len(s) for s in SEQS])).logits
        got = ours.classify(ours(ids, positions, meta), meta)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    named = ours.hf_tensors(ours.state_dict())
    assert named.keys() == reference.state_dict().keys()
    assert all(torch.equal(named[k], v) for k, v in reference.state_dict().items())


def test_a_bare_model_has_no_classifier(bare):
    ours = _ours(bare)
    ids, positions, meta = flatten(SEQS, causal=False)
    with pytest.raises(ValueError, match="no classification head \\(architecture 'NomicBertModel'\\)"):
        ours.classify(ours(ids, positions, meta), meta)
