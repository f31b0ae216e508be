"""`AsyncEmbedder`: the servers' door to an encoder; inputs checked once, embeddings off the event loop."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmkernel import LmkError
from lmkernel.engine.async_embedder import AsyncEmbedder
from lmkernel.errors import ContextLengthError


def test_checks_name_the_input_and_embeddings_equal_the_models(minilm, smollm, phrasebank_sentences):
    embedder = AsyncEmbedder(minilm)
    assert embedder.dimensions == minilm.config.hidden_size
    limit, vocab = embedder.max_input_tokens, minilm.config.vocab_size
    with pytest.raises(ValueError, match=r"input\[1\] is empty"):
        embedder.check_inputs([[101, 102], []])
    with pytest.raises(ValueError, match=rf"input\[0\]: token id {vocab} is outside the vocabulary"):
        embedder.check_inputs([[101, vocab]])
    with pytest.raises(ContextLengthError, match=rf"input\[0\] has {limit + 1} tokens; this model takes at most {limit}"):
        embedder.check_inputs([[101] * (limit + 1)])
    texts = phrasebank_sentences[:5]
    ids = [minilm.tokenizer.encode(t) for t in texts]
    got = asyncio.run(embedder.embed(ids))
    torch.testing.assert_close(got, minilm.embed(texts), rtol=0, atol=1e-6)
    with pytest.raises(LmkError, match="embeddings need an encoder"):
        AsyncEmbedder(smollm)
