"""Retrieval quality of a sentence encoder on a task built from any text: each paragraph of at least three
sentences is cut after its first sentence; the first sentence is the query, the rest the one relevant
document among all the others. What it measures is whether an encoder puts a passage's opening and its
continuation close together, across many topics, which is what a RAG lookup asks of it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass(frozen=True)
class RetrievalTask:
    queries: list[str]
    documents: list[str]  # documents[i] answers queries[i]


@dataclass(frozen=True)
class RetrievalResult:
    recall_at_1: float
    recall_at_10: float
    mrr_at_10: float
    queries: int
    documents: int


def continuation_task(text: str, limit: int | None = None, min_words: int = 40) -> RetrievalTask:
    """Queries (first sentences) and documents (the rest) from the paragraphs of `text`, one per line, skipping
    headings (WikiText's `= Title =` lines) and paragraphs shorter than `min_words` words."""
    queries, documents = [], []
    for line in text.splitlines():
        paragraph = line.strip()
        if not paragraph or paragraph.startswith("=") or len(paragraph.split()) < min_words:
            continue
        sentences = _SENTENCE_END.split(paragraph)
        if len(sentences) < 3:
            continue
        queries.append(sentences[0])
        documents.append(" ".join(sentences[1:]))
        if limit is not None and len(queries) == limit:
            break
    if len(queries) < 2:
        raise LmkError(f"the text holds {len(queries)} paragraph(s) of three sentences or more; a retrieval task needs two")
    return RetrievalTask(queries, documents)


def evaluate_retrieval(model: LoadedModel, task: RetrievalTask, query_prompt: str | None = None,
                       document_prompt: str | None = None) -> RetrievalResult:
    """Recall@1, recall@10 and MRR@10 of `model` on `task`, by cosine similarity; the prompts name the model's
    prefixes (EmbeddingGemma's and nomic's "query" and "document")."""
    q = torch.nn.functional.normalize(model.embed(task.queries, prompt_name=query_prompt), dim=-1)
    d = torch.nn.functional.normalize(model.embed(task.documents, prompt_name=document_prompt), dim=-1)
    scores = q @ d.T
    right = scores.diagonal()[:, None]
    rank = (scores > right).sum(1)  # documents scored above the relevant one
    top10 = rank < 10
    return RetrievalResult(
        recall_at_1=float((rank == 0).float().mean()),
        recall_at_10=float(top10.float().mean()),
        mrr_at_10=float(torch.where(top10, 1.0 / (rank + 1).float(), torch.zeros(())).mean()),
        queries=len(task.queries), documents=len(task.documents),
    )
