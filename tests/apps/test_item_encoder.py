"""The recommender's item encoder on an encoder other than BERT: nomic-embed-text-v1.5 (its GGUF), whose
documents take the `search_document: ` prompt. Only the top layers learn; the item vectors are the model's
document embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmkernel import load_model
from lmkernel.apps.item_encoder import EncoderTraining, fine_tune, item_vectors
from lmkernel.registry import ALIASES, alias_location

pytestmark = pytest.mark.slow  # a 137M encoder trained for a few steps: `make test` runs it, `make test-fast` does not


def test_top_layers_of_nomic_learn_behaviour_pairs(phrasebank_sentences) -> None:
    loaded = load_model(alias_location(ALIASES["nomic-embed-text-v1.5"]), quantization=None)  # as `lmk recommend fit`
    texts = phrasebank_sentences[:96]
    pairs = np.array([(i, i + 1) for i in range(0, 95, 2)])  # neighbours "chosen by one user"
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    np.testing.assert_allclose(item_vectors(loaded, texts[:4]),
                               loaded.embed(texts[:4], prompt_name="document").numpy(), atol=1e-6)
    losses = fine_tune(loaded, texts, pairs, EncoderTraining(steps=16, batch_size=16, lr=2e-4, trainable_layers=2))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    layers = len(loaded.model.stack)
    assert all(n.startswith((f"encoder.layers.{layers - 2}.", f"encoder.layers.{layers - 1}.")) for n in changed), \
        sorted(changed)[:5]
    assert {f"encoder.layers.{layers - 1}.attn.Wqkv.weight", f"encoder.layers.{layers - 2}.mlp.fc2.weight"} <= changed
    assert not any(p.requires_grad for p in loaded.model.parameters())  # frozen again for serving
