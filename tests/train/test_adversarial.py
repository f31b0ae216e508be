"""Adversarial training on the embeddings (FGM, PGD) and the typo-noised copy it is measured on."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.eval.classify import Example, typos, with_typos
from lmkernel.train.adversarial import EmbeddingAttack


def test_typos_are_seeded_and_at_the_rate():
    text = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 " * 20
    assert typos(text, 0.0, random.Random(0)) == text
    a, b = typos(text, 0.1, random.Random(1)), typos(text, 0.1, random.Random(1))
    assert a == b and a != text
    assert with_typos([Example(text, "positive")], 0.1, seed=1)[0].text == a
    short = text[: len(text) // 4]
    noised, letters = typos(short, 0.1, random.Random(2)), sum(c.isalpha() for c in short)
    # A tenth of the letters edited: a drop or a doubled letter is one edit, a swap two.
    assert 0.05 * letters < _edit_distance(short, noised) < 0.25 * letters


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


class _Tiny(nn.Module):
    """Embedding, one linear layer, mean over tokens: enough to check the attack's arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(0, keepdim=True))


def _loss(model: nn.Module, ids: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    e = model.embed(ids) if delta is None else model.embed.weight[ids] + delta
    return nn.functional.cross_entropy(model.head(e.mean(0, keepdim=True)), torch.tensor([1]))


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_the_step_adds_the_gradient_at_the_worst_embeddings_within_epsilon(method):
    model, ids = _Tiny(), torch.tensor([3, 5, 7, 5])
    params = list(model.parameters())
    attack = EmbeddingAttack(model, 20, method, epsilon=0.5, steps=3)
    attack.step(lambda: nn.functional.cross_entropy(model(ids), torch.tensor([1])).backward(), params)
    got = [p.grad.clone() for p in params]
    # By hand: the clean gradient, then the perturbation (ascent steps projected into ||r|| <= 0.5).
    delta = torch.zeros(4, 6)
    for _ in range(1 if method == "fgm" else 3):
        d = delta.clone().requires_grad_(True)
        g = torch.autograd.grad(_loss(model, ids, d), d)[0]
        step = 0.5 if method == "fgm" else 0.5 / 3
        delta = delta + g * step / g.norm()
        delta = delta * min(1.0, 0.5 / float(delta.norm()))
        if method == "fgm":
            break
    assert float(delta.norm()) <= 0.5 + 1e-6
    for p in params:
        p.grad = None
    (_loss(model, ids) + _loss(model, ids, delta)).backward()
    for a, b in zip(got, (p.grad for p in params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    attack.close()
    assert model(ids).shape == (1, 3)  # after close, no hook remains


def test_a_model_without_word_embeddings_is_refused():
    with pytest.raises(LmkError, match="no word-embedding table"):
        EmbeddingAttack(nn.Linear(3, 3), 20, "fgm", 1.0)
    with pytest.raises(LmkError, match="fgm or pgd|one of fgm, pgd"):
        EmbeddingAttack(_Tiny(), 20, "free", 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_training_runs_on_a_real_encoder_and_changes_the_update(method, tmp_path):
    from safetensors.torch import load_file

    from shared_paths import SHARED_DATA
    from lmkernel.train.args import TrainArgs
    from lmkernel.train.trainer import train

    data = tmp_path / "train.jsonl"
    lines = (SHARED_DATA / "financial-phrasebank" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[:16]), encoding="utf-8")
    common = dict(task="classify", model="all-minilm-l6-v2", data=str(data), max_steps=1, batch_size=16, warmup=0,
                  lr=1e-3, checkpointing=False)
    plain = train(TrainArgs(**common, output=str(tmp_path / "plain")))
    attacked = train(TrainArgs(**common, output=str(tmp_path / method), adversarial=method, adv_epsilon=2.0))
    assert plain.train_loss == pytest.approx(attacked.train_loss, rel=1e-6)  # the reported loss is the clean one
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / method / "model" / "model.safetensors")
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert "classifier.weight" in moved and len(moved) > len(a) // 2  # the adversarial gradient reached every layer
