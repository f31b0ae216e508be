"""`lmk bench embed`: both sides embed the same texts (their embeddings agree) and both speeds are counted."""

from __future__ import annotations

import pytest

from lmkernel.bench.embed import embed_speed

pytestmark = pytest.mark.slow  # loads the sentence-transformers peer: make test runs it, make test-fast does not


def test_embed_speed_times_both_sides_on_the_same_texts(minilm, phrasebank_sentences):
    texts = phrasebank_sentences[:24]
    r = embed_speed(minilm, texts, rounds=1, threads=1, batch_size=8)
    assert r.peer == "sentence-transformers" and r.sentences == 24
    assert r.tokens == sum(len(ids) for ids in minilm.tokenizer.encode_batch(texts))
    assert r.ours > 0 and r.theirs > 0
    assert r.min_cosine >= 0.9999  # the same model on both sides
