"""Sliding-window perplexity against transformers' own computation of the same windows."""

from __future__ import annotations

import math

import pytest
import torch

from lmkernel.errors import LmkError
from lmkernel.eval.perplexity import perplexity

pytestmark = pytest.mark.slow  # perplexity over thousands of tokens: `make test` runs it, `make test-fast` does not


def test_matches_transformers_sliding_window(smollm, hf_smollm_model, wikitext_lines) -> None:
    text = "\n".join(wikitext_lines[:40])
    ours = perplexity(smollm, text, max_tokens=600, window=256)
    ids = torch.tensor([smollm.tokenizer.encode(text, add_special_tokens=False)[:600]])
    nll, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, ids.shape[1], 128):  # the loop of Hugging Face's perplexity guide
            end = min(begin + 256, ids.shape[1])
            target = ids[:, begin:end].clone()
            target[:, : prev_end - begin] = -100
            loss = hf_smollm_model(ids[:, begin:end], labels=target).loss
            scored = int((target[:, 1:] != -100).sum())
            nll, count, prev_end = nll + float(loss) * scored, count + scored, end
            if end == ids.shape[1]:
                break
    assert ours.tokens == count == 599
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_refuses_an_encoder_and_empty_text(minilm, smollm) -> None:
    with pytest.raises(LmkError, match="causal LM"):
        perplexity(minilm, "some text")
    with pytest.raises(LmkError, match="fewer than 2"):
        perplexity(smollm, "a", max_tokens=1)
