"""SamplingParams checks and the Sampler: greedy, penalties, top-k/top-p/min-p, seeded streams, and how
min_tokens bans and grammar masks combine."""

from __future__ import annotations

import pytest
import torch

from lmkernel.engine.sampling import Sampler, SamplingParams, apply_penalties, filter_logits, top_logprobs


@pytest.mark.parametrize(("field", "value"), [("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.5),
                                              ("top_k", -2), ("logprobs", 21), ("stop", [""]), ("min_tokens", 20)])
def test_bad_params_name_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(max_tokens=10, **{field: value})


def test_penalties() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0, 1], num_prompt=2)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive logits divided, negative multiplied
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), [3, 2, 2], num_prompt=1)
    assert out.tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.5 * 2, 0.5]  # only output tokens (after the prompt) count


def test_filters_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.7)) == [0, 1]  # 0.5 < 0.7, then 0.8 reaches it
    assert kept(SamplingParams(min_p=0.5)) == [0, 1]  # at least half the top probability (0.25)


def test_greedy_seeded_and_masked_rows() -> None:
    sampler = Sampler(seed=0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=0), SamplingParams(temperature=0)]
    gens = [None, torch.Generator().manual_seed(7), None, None]
    allowed = [None, None, torch.tensor([True, False, True, False]), torch.tensor([False, True, False, False])]
    banned = [[], [], [], [1]]  # min_tokens bans token 1 in row 3, but its grammar allows nothing else: the grammar wins
    out = sampler(logits, params, [[0]] * 4, [1] * 4, gens, banned, allowed)
    assert out.token_ids[0] == 1 and out.token_ids[2] == 2 and out.token_ids[3] == 1
    again = Sampler(seed=123)(logits, params, [[0]] * 4, [1] * 4, [None, torch.Generator().manual_seed(7), None, None],
                              banned, allowed)
    assert again.token_ids[1] == out.token_ids[1]  # a seeded row draws from its own stream, whatever the default


def test_top_logprobs_rank_the_chosen_token() -> None:
    lp = torch.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.0]), -1)
    ranked = top_logprobs(lp, chosen=2, n=2)
    assert [(t, r) for t, _, r in ranked] == [(2, 3), (1, 1), (3, 2)]
