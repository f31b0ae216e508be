"""Embedding fidelity: how close a (compressed) encoder's sentence embeddings stay to a reference's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmkernel.errors import LmkError
from lmkernel.eval.perplexity import read_text
from lmkernel.loading import LoadedModel


@dataclass(frozen=True)
class FidelityResult:
    mean_cosine: float
    min_cosine: float
    sentences: int


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file."""
    return [line for line in read_text(path).splitlines() if line.strip()]


def embedding_fidelity(model: LoadedModel, reference: LoadedModel, texts: list[str]) -> FidelityResult:
    """Cosine similarity, sentence by sentence, of `model`'s embeddings against `reference`'s."""
    if not texts:
        raise LmkError("no sentences to embed")
    if model.config.hidden_size != reference.config.hidden_size:
        raise LmkError(f"the models embed in {model.config.hidden_size} and {reference.config.hidden_size} "
                       "dimensions; they cannot be compared")
    cos = torch.nn.functional.cosine_similarity(model.embed(texts), reference.embed(texts), dim=-1)
    return FidelityResult(float(cos.mean()), float(cos.min()), len(texts))
