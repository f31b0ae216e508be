"""`load_model` on the real models, checked against the Hugging Face references on the same files."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LmkError, load_model
from lmkernel.loading import resolve_dtype


def test_minilm_embeddings_match_sentence_transformers(minilm, st_minilm, phrasebank_sentences):
    sentences = phrasebank_sentences[:100]
    ours = minilm.embed(sentences)
    ref = st_minilm.encode(sentences, convert_to_tensor=True).float()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert ours.shape == (100, 384)
    assert cosine.min().item() >= 0.9999, f"min cosine {cosine.min().item()}"
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(100), atol=1e-5, rtol=0)


def test_embed_truncates_long_texts_like_sentence_transformers(minilm, st_minilm):
    long_text = "revenue grew strongly " * 400  # far past 256 tokens
    ours = minilm.embed([long_text, "short"])
    ref = st_minilm.encode([long_text, "short"], convert_to_tensor=True).float()
    assert torch.nn.functional.cosine_similarity(ours, ref).min().item() >= 0.9999




def test_wrong_model_kind_and_bad_arguments(smollm, minilm):
    with pytest.raises(LmkError, match="encoder"):
        minilm.logits([1, 2, 3])
    with pytest.raises(LmkError, match="decoder"):
        smollm.embed(["x"])
    with pytest.raises(LmkError, match=r"token id 49152 is outside the vocabulary"):
        smollm.logits([1, 49152])
    with pytest.raises(LmkError, match="empty"):
        smollm.logits([])
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(LmkError, match="dtype 'float8'"):
        load_model("smollm2-135m-instruct", dtype="float8")
    with pytest.raises(LmkError, match="device 'tpu'"):
        load_model("smollm2-135m-instruct", device="tpu")


def test_bfloat16_load_stays_close(smollm_gguf, smollm):
    ids = smollm.tokenizer.encode("The European lobster is a species of clawed lobster.")
    bf16 = load_model(smollm_gguf, dtype="bfloat16", quantization=None)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    ref = torch.log_softmax(smollm.logits(ids), -1)
    got = torch.log_softmax(bf16.logits(ids), -1)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
