"""The continuation retrieval task: built from paragraphs, scored by rank, and an encoder does far better than
chance while the same documents shuffled out of order score near chance."""

from __future__ import annotations

import random

import pytest

from lmkernel.errors import LmkError
from lmkernel.eval.retrieval import RetrievalTask, continuation_task, evaluate_retrieval

TEXT = """ = A heading =
 The first sentence is the query. The second one is part of the document. And the third too, which makes it long enough for the task to take.
 Too short. Not taken.
 Another paragraph opens here. Its continuation follows. It ends with a third sentence so that the splitter has three parts to work with here.
"""


def test_paragraphs_are_cut_after_their_first_sentence():
    task = continuation_task(TEXT, min_words=10)
    assert task.queries == ["The first sentence is the query.", "Another paragraph opens here."]
    assert task.documents[0].startswith("The second one") and task.documents[1].endswith("work with here.")
    with pytest.raises(LmkError, match="a retrieval task needs two"):
        continuation_task(" = x =\n short.\n", min_words=1)


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_an_encoder_finds_continuations_far_above_chance(minilm, wikitext_lines):
    task = continuation_task("\n".join(wikitext_lines[:1500]), limit=60, min_words=40)
    result = evaluate_retrieval(minilm, task)
    assert result.queries == 60 and result.recall_at_10 >= 0.6 and result.recall_at_1 >= 0.3
    assert result.recall_at_1 <= result.recall_at_10 and result.recall_at_1 <= result.mrr_at_10 <= result.recall_at_10
    shuffled = list(task.documents)
    random.Random(0).shuffle(shuffled)
    control = evaluate_retrieval(minilm, RetrievalTask(task.queries, shuffled))
    assert control.recall_at_10 <= 0.4  # chance is 10 / 60
