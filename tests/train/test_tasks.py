"""Task losses and batches: what is scored, how masking draws, and the chunked output layer."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmkernel.train import tasks
from lmkernel.train.data import IGNORE
from lmkernel.train.tasks import CausalLM, MaskedLM


def test_chunked_recomputed_logits_give_the_plain_loss_and_gradients(smollm, monkeypatch):
    model = smollm.model
    task = CausalLM(smollm.tokenizer, smollm.config, 64, seed=0)
    ids = smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:40]
    assert len(ids) == 40
    items = [[(ids[:25], ids[:25]), (ids[25:], [IGNORE] * 5 + ids[30:])]]
    batch = task.collate(items, [0], 0, torch.device("cpu"))
    assert batch.num_targets == 24 + 10  # each segment's labels, shifted by one; none across segments
    monkeypatch.setattr(tasks, "LOGIT_CHUNK", 7)
    head = model.lm_head.weight
    model.train()
    try:
        chunked = task.loss_sum(model, batch)
        (grad_chunked,) = torch.autograd.grad(chunked, head)
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        keep = batch.targets != IGNORE
        plain = F.cross_entropy(model.compute_logits(hidden[keep]), batch.targets[keep], reduction="sum")
        (grad_plain,) = torch.autograd.grad(plain, head)
    finally:
        model.eval()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-3, atol=1e-3)  # float32 sums in another order


def test_masking_draws_fifteen_percent_of_ordinary_tokens_eighty_ten_ten(minilm):
    task = MaskedLM(minilm.tokenizer, minilm.config, None, seed=0)
    ids = minilm.tokenizer.encode("the market rose on strong quarterly earnings and higher guidance " * 40)
    chosen = masked = kept = 0
    for i in range(40):
        inputs, targets = task.mask(ids, random.Random(i))
        assert inputs[0] == ids[0] and inputs[-1] == ids[-1] and targets[0] == targets[-1] == IGNORE  # [CLS], [SEP]
        picks = [p for p, t in enumerate(targets) if t != IGNORE]
        assert all(targets[p] == ids[p] for p in picks)
        chosen += len(picks)
        masked += sum(inputs[p] == task.mask_id for p in picks)
        kept += sum(inputs[p] == ids[p] for p in picks)
    ordinary = 40 * (len(ids) - 2)
    assert chosen / ordinary == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert kept / chosen == pytest.approx(0.1, abs=0.02)
    # The same (seed, epoch, index) always masks the same way: resumed runs and other processes agree.
    batch = task.collate([ids[:20], ids[:30]], [0, 1], 3, torch.device("cpu"))
    again = task.collate([ids[:20], ids[:30]], [0, 1], 3, torch.device("cpu"))
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.targets, again.targets)
