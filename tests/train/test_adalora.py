"""AdaLoRA's rank allocator on small layers: the cubic budget schedule, masking to exactly the budget by
importance, a final pattern held fixed, and an orthogonality penalty that is zero for orthonormal factors."""

from __future__ import annotations

import torch
from torch import nn

from lmkernel.layers.adalora import AdaLoraLinear
from lmkernel.train.adalora import RankAllocator


def _layers(seed: int = 0) -> dict[str, AdaLoraLinear]:
    torch.manual_seed(seed)
    return {f"l{i}": AdaLoraLinear(nn.Linear(16, 16), r=6, alpha=12.0) for i in range(3)}


def test_the_budget_falls_on_a_cubic_schedule_from_the_initial_to_the_target_rank():
    alloc = RankAllocator(_layers(), target_r=2, total_steps=100, tinit=10, tfinal=20, every=5)
    assert (alloc.init_budget, alloc.target_budget) == (18, 6)
    assert alloc.budget(5) == (18, False)  # warm-up: every triplet kept
    assert alloc.budget(45) == (int(12 * (1 - 35 / 70) ** 3 + 6), True)
    assert alloc.budget(90) == (6, True)  # the last tfinal steps hold the target


def test_masking_keeps_exactly_the_budget_by_importance_and_holds_the_final_pattern():
    layers = _layers()
    alloc = RankAllocator(layers, target_r=2, total_steps=20, tinit=0, tfinal=5, every=1)
    for m in layers.values():
        with torch.no_grad():
            m.lora_E.normal_()
    x = torch.randn(8, 16)
    for step in range(1, 21):
        for m in layers.values():
            m.zero_grad()
        sum(m(x).pow(2).sum() for m in layers.values()).backward()
        alloc.step(step)
        kept = sum(int(p.sum()) for p in alloc.pattern.values())
        if step >= 15:
            assert kept == 6
    nonzero = sum(int((m.lora_E != 0).sum()) for m in layers.values())
    assert nonzero == 6 and all((m.lora_E[~alloc.pattern[n]] == 0).all() for n, m in layers.items())


def test_the_orthogonality_penalty_vanishes_for_orthonormal_factors():
    layers = _layers()
    alloc = RankAllocator(layers, target_r=2, total_steps=10, tinit=0, tfinal=0)
    assert float(alloc.orthogonality()) > 0.1
    with torch.no_grad():
        for m in layers.values():
            q, _ = torch.linalg.qr(torch.randn(16, 6))
            m.lora_A.copy_(q.T)
            m.lora_B.copy_(q)
    assert float(alloc.orthogonality()) < 1e-5
