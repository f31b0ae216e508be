"""Calibration text the model generates itself (the default of `lmk quantize` and `lmk prune`): the
asked-for shape, the same sequences for the same seed, tokens of text from the vocabulary, and
exactly what sampling from a full forward over each prefix gives (the K/V cache changes nothing)."""

from __future__ import annotations

import pytest
import torch

from lmkernel.compress.calibrate import _sample, generated_sequences
from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata


def _banned(lm) -> torch.Tensor:
    banned = torch.zeros(lm.config.vocab_size, dtype=torch.bool)
    banned[[*lm.tokenizer.all_special_ids, *lm.config.eos_token_ids]] = True
    return banned


def test_shape_seed_and_vocabulary(smollm) -> None:
    seqs = generated_sequences(smollm, count=4, length=10, seed=0)
    assert len(seqs) == 4 and all(len(s) == 10 for s in seqs)
    assert generated_sequences(smollm, count=4, length=10, seed=0) == seqs
    assert generated_sequences(smollm, count=4, length=10, seed=1) != seqs
    bos, banned = smollm.tokenizer.bos_token_id, _banned(smollm)
    assert bos is not None and all(s[0] == bos for s in seqs)
    rest = torch.tensor([s[1:] for s in seqs])
    assert 0 <= int(rest.min()) and int(rest.max()) < smollm.tokenizer.vocab_size
    assert not banned[rest].any(), "a special token (end of sequence included) was sampled"
    assert len({tuple(s) for s in seqs}) == 4  # sampled, not greedy: the sequences differ


def test_the_cache_gives_what_a_full_forward_over_each_prefix_gives(smollm) -> None:
    count, length, seed = 3, 8, 7
    seqs = generated_sequences(smollm, count, length, seed)
    generator, banned = torch.Generator().manual_seed(seed), _banned(smollm)
    last = int((~banned).nonzero().max())
    tokens = [[smollm.tokenizer.bos_token_id] for _ in range(count)]
    with torch.inference_mode():
        for t in range(1, length):
            meta = AttentionMetadata.for_lengths([t] * count, causal=True)
            hidden = smollm.model(torch.tensor(sum(tokens, [])), torch.arange(t).repeat(count), meta)
            logits = smollm.model.compute_logits(hidden[torch.tensor(meta.cu_seqlens[1:]) - 1]).float()
            logits[:, banned] = float("-inf")
            for row, token in zip(tokens, _sample(torch.softmax(logits, -1), generator, last).tolist()):
                row.append(token)
    assert tokens == seqs


def test_refusals(smollm, minilm) -> None:
    with pytest.raises(LmkError, match="encoder cannot generate"):
        generated_sequences(minilm, 2, 8)
    with pytest.raises(LmkError, match="length"):
        generated_sequences(smollm, 2, 1)
    with pytest.raises(LmkError, match="count"):
        generated_sequences(smollm, 0, 8)
