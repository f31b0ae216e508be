"""models/interface.py: what the CausalLM and Encoder protocols promise, on real calls of every model class (tiny
random configs) and of the real SmolLM2 and all-MiniLM-L6-v2."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.models import model_class
from lmkernel.models.interface import CausalLM, Encoder, FusedDecoder

H, V = 16, 50
LABELS = {0: "neg", 1: "neu", 2: "pos"}
DECODERS = {
    "llama": ModelConfig("llama", V, H, 32, 2, 2, 1, 8, 32, hf_architecture="LlamaForCausalLM"),
    "gpt2": ModelConfig("gpt2", V, H, 32, 2, 2, 2, 8, 32, hidden_act="gelu_new", tie_word_embeddings=True,
                        hf_architecture="GPT2LMHeadModel"),
    "gemma3": ModelConfig("gemma3", V, H, 32, 2, 2, 1, 8, 32, hidden_act="gelu_pytorch_tanh", sliding_window=4,
                          layer_types=("sliding_attention", "full_attention"), hf_architecture="Gemma3ForCausalLM"),
}
ENCODERS = {
    "bert": ModelConfig("bert", V, H, 32, 2, 2, 2, 8, 32, type_vocab_size=2, hidden_act="gelu", hf_architecture="BertModel"),
    "mpnet": ModelConfig("mpnet", V, H, 32, 2, 2, 2, 8, 34, hidden_act="gelu", hf_architecture="MPNetModel"),
    "nomic_bert": ModelConfig("nomic_bert", V, H, 32, 2, 2, 2, 8, 32, type_vocab_size=2, hf_architecture="NomicBertModel"),
    "gemma3": ModelConfig("gemma3", V, H, 32, 2, 2, 1, 8, 32, bidirectional=True, hidden_act="gelu_pytorch_tanh",
                          sliding_window=4, hf_architecture="Gemma3TextModel"),
}
SEQS = [[3, 17, 9, 40, 22, 8], [11, 2, 30]]


def _random(config: ModelConfig) -> torch.nn.Module:
    model = model_class(config)(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _alone(model, seq: list[int], causal: bool, **kwargs) -> torch.Tensor:
    ids, positions, meta = flatten([seq], causal=causal)
    return model(ids, positions, meta, **kwargs)


@pytest.mark.parametrize("name", DECODERS)
def test_a_decoder_keeps_sequences_apart_attends_backwards_and_scores_the_vocabulary(name):
    """forward: [N, hidden], each sequence as alone, a row blind to later tokens; compute_logits: the head's scores."""
    model = _random(DECODERS[name])
    assert isinstance(model, CausalLM)
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        hidden = model(ids, positions, meta)
        alone = [_alone(model, s, True) for s in SEQS]
        prefix = _alone(model, SEQS[0][:3], True)
        logits = model.compute_logits(hidden)
    assert hidden.shape == (9, H)
    torch.testing.assert_close(hidden, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix, alone[0][:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, F.linear(hidden, model.lm_head.weight), atol=1e-5, rtol=1e-5)
    fused = model.fused_decode()
    if name == "llama":  # float32 on CPU, SiLU, dense projections: the compiled step; it covers decodes only
        assert isinstance(fused, FusedDecoder) and not fused.covers(9, meta)
    else:
        assert fused is None


@pytest.mark.parametrize("name", ENCODERS)
def test_an_encoder_keeps_sequences_apart_attends_both_ways_and_pools_each(name):
    """forward: [N, hidden], each sequence as alone, a row changed by a later token; pool: each sequence's mean;
    classify: refused without a head, [B, labels] per sequence with one."""
    model = _random(ENCODERS[name])
    assert isinstance(model, Encoder)
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.no_grad():
        hidden = model(ids, positions, meta, token_type_ids=None)
        alone = [_alone(model, s, False) for s in SEQS]
        shorter = _alone(model, SEQS[0][:3], False)
        pooled = model.pool(hidden, meta)
    assert hidden.shape == (9, H)
    torch.testing.assert_close(hidden, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert (shorter - alone[0][:3]).abs().max() > 1e-3
    if name != "gemma3":  # EmbeddingGemma's pool goes on through its Dense layers (none here)
        torch.testing.assert_close(pooled, torch.stack([hidden[:6].mean(0), hidden[6:].mean(0)]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=f"no classification head \\(architecture '{ENCODERS[name].hf_architecture}'\\)"):
        model.classify(hidden, meta)

    arch = {"gemma3": "Gemma3TextForSequenceClassification"}.get(name, ENCODERS[name].hf_architecture.replace(
        "Model", "ForSequenceClassification"))
    headed = _random(replace(ENCODERS[name], hf_architecture=arch, id2label=LABELS))
    with torch.no_grad():
        labels = headed.classify(headed(ids, positions, meta), meta)
        each = [headed.classify(_alone(headed, s, False), AttentionMetadata.for_lengths([len(s)], causal=False)) for s in SEQS]
    assert labels.shape == (2, 3)
    torch.testing.assert_close(labels, torch.cat(each), atol=1e-5, rtol=1e-5)


def test_models_meet_the_interface(smollm, minilm, st_minilm):
    """The interface's calls do what it says: a decoder's forward over sequences laid end to end gives each the
    logits it gets alone (no sequence sees another), its fused decode step says it does not cover a prefill and
    refuses to run one, and an encoder's pooled output is sentence-transformers' embedding."""
    a, b = [1, 400, 2000, 35, 9], [77, 8, 1234]
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    meta = AttentionMetadata.for_lengths([5, 3], causal=True)
    lm, enc = smollm.model, minilm.model
    texts = ["Profit rose.", "Sales fell sharply in the quarter."]
    ids = [minilm.tokenizer.encode(t) for t in texts]
    with torch.inference_mode():
        both = lm.compute_logits(lm(torch.tensor(a + b), positions, meta))
        alone = [lm.compute_logits(lm(torch.tensor(x), torch.arange(len(x)), AttentionMetadata.for_lengths([len(x)], causal=True)))
                 for x in (a, b)]
        fused = lm.fused_decode()
        covers = fused.covers(len(a + b), meta)
        with pytest.raises(ValueError, match="covers steps of 1 to 16 decodes"):
            fused(torch.tensor(a + b), positions, meta, [])
        bidirectional = AttentionMetadata.for_lengths([len(x) for x in ids], causal=False)
        hidden = enc(torch.tensor([t for x in ids for t in x]), torch.cat([torch.arange(len(x)) for x in ids]), bidirectional)
        pooled = enc.pool(hidden, bidirectional)
    assert both.shape == (8, smollm.config.vocab_size) and not covers
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, torch.from_numpy(st_minilm.encode(texts)), atol=2e-5, rtol=1e-4)
