"""Embedding fidelity of MiniLM in bfloat16 against float32, through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmkernel.errors import LmkError
from lmkernel.eval.embeddings import embedding_fidelity
from lmkernel.loading import load_model


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_bfloat16_minilm_stays_close(minilm, phrasebank_sentences, tmp_path) -> None:
    sentences = phrasebank_sentences[:64]
    same = embedding_fidelity(minilm, minilm, sentences)
    assert same.mean_cosine == pytest.approx(1.0, abs=1e-6) and same.sentences == 64
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(sentences) + "\n\n")
    out = subprocess.run([sys.executable, "-m", "lmkernel.cli", "eval", "embeddings", "all-minilm-l6-v2", "--reference",
                          "all-minilm-l6-v2", "--data", str(data), "--dtype", "bfloat16", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.99 <= result["min_cosine"] <= result["mean_cosine"] < 1.0


def test_refuses_what_cannot_be_compared(minilm, smollm) -> None:
    with pytest.raises(LmkError, match="no sentences"):
        embedding_fidelity(minilm, minilm, [])
    with pytest.raises(LmkError):
        embedding_fidelity(smollm, minilm, ["x"])
