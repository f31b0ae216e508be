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


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("n", 1.5, "an integer >= 1"), ("max_tokens", 0, "an integer >= 1 or None"),
    ("max_tokens", 2.0, "an integer >= 1 or None"),
    ("min_tokens", -1, "an integer >= 0"), ("min_tokens", 11, "<= max_tokens (10)"), ("temperature", 100.5, "in [0, 100]"),
    ("top_k", 1.5, "-1, 0 (all tokens) or a positive integer"), ("top_p", 1.01, "in (0, 1]"), ("min_p", -0.01, "in [0, 1]"),
    ("repetition_penalty", 10.5, "in (0, 10]"), ("repetition_penalty", 0.0, "in (0, 10]"),
    ("presence_penalty", -2.01, "in [-2, 2]"), ("presence_penalty", 2.01, "in [-2, 2]"),
    ("frequency_penalty", -2.01, "in [-2, 2]"), ("frequency_penalty", 2.01, "in [-2, 2]"),
    ("seed", 2**63, "an integer in [-2^63, 2^63) or None"), ("seed", -(2**63) - 1, "an integer in [-2^63, 2^63) or None"),
    ("seed", 1.0, "an integer in [-2^63, 2^63) or None"), ("stop", ["end", 3], "non-empty strings"),
    ("stop_token_ids", [-1], "token ids >= 0"), ("stop_token_ids", ["2"], "token ids >= 0"),
    ("lora", "", "None or the name of a served LoRA adapter"), ("lora", 3, "None or the name of a served LoRA adapter"),
    ("logprobs", -1, "None or 0..20"), ("logprobs", 1.0, "None or 0..20"), ("prompt_logprobs", 21, "None or 0..20"),
    ("prompt_logprobs", -1, "None or 0..20"),
    ("structured_outputs", "json", "None, a StructuredOutputs or a dict of its fields"),
])
def test_a_value_out_of_range_is_refused_with_the_range_and_the_value(field, value, expected) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{"max_tokens": 10, field: value})
    assert str(err.value) == f"SamplingParams.{field} must be {expected}; got {value!r}"


@pytest.mark.parametrize(("field", "value"), [
    ("n", 1), ("max_tokens", 1), ("max_tokens", None), ("min_tokens", 0), ("temperature", 0.0), ("temperature", 100.0),
    ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_p", 1.0), ("top_p", 1e-6), ("min_p", 0.0), ("min_p", 1.0),
    ("repetition_penalty", 10.0), ("repetition_penalty", 1e-6), ("presence_penalty", -2.0), ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0), ("frequency_penalty", 2.0), ("seed", -(2**63)), ("seed", 2**63 - 1), ("seed", None),
    ("stop_token_ids", [0]), ("lora", "support"), ("logprobs", 0), ("logprobs", 20), ("prompt_logprobs", 0),
    ("prompt_logprobs", 20),
])
def test_the_ends_of_each_range_are_accepted(field, value) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_min_tokens_may_equal_max_tokens_and_is_not_bounded_without_one() -> None:
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500


def test_stop_strings_and_ids_become_lists() -> None:
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(2, 3)).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(2, 3)).stop_token_ids == [2, 3]


def test_structured_outputs_given_as_a_dict_becomes_the_constraint() -> None:
    from lmkernel.engine.structured import StructuredOutputs

    assert SamplingParams(structured_outputs={"regex": "[0-9]+"}).structured_outputs == StructuredOutputs(regex="[0-9]+")
    constraint = StructuredOutputs(choice=["yes", "no"])
    assert SamplingParams(structured_outputs=constraint).structured_outputs is constraint


def test_greedy_below_a_temperature_of_1e_5() -> None:
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=0.9e-5).greedy
    assert not SamplingParams(temperature=1e-5).greedy and not SamplingParams(temperature=0.5).greedy


def test_repetition_penalty_counts_each_seen_token_once_and_leaves_the_rest() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=0.5), [2, 2, 4, 1], num_prompt=4)
    assert out.tolist() == [2.0, -1.0, 2.0, 0.5, 0.0]  # a penalty under 1 favours seen tokens


def test_presence_alone_and_frequency_alone_penalise_output_tokens() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    presence = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5), [0, 1, 1, 1, 2], num_prompt=1)
    assert presence.tolist() == [1.0, 0.5, 0.5, 1.0, 1.0]
    frequency = apply_penalties(logits.clone(), SamplingParams(frequency_penalty=0.25), [0, 1, 1, 1, 2], num_prompt=1)
    assert frequency.tolist() == [1.0, 0.25, 0.75, 1.0, 1.0]
    both = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    untouched = apply_penalties(logits.clone(), both, [0, 1], num_prompt=2)
    assert untouched.tolist() == [1.0] * 5  # no output yet


def test_temperature_divides_the_logits() -> None:
    out = filter_logits(torch.tensor([2.0, -1.0, 0.5]), SamplingParams(temperature=2.0))
    assert out.tolist() == [1.0, -0.5, 0.25]


def test_filters_at_their_thresholds() -> None:
    flat = torch.zeros(4)  # four tokens of probability 0.25 each
    kept = lambda p: torch.isfinite(filter_logits(flat, p)).sum().item()  # noqa: E731
    assert kept(SamplingParams(top_p=0.49)) == 2 and kept(SamplingParams(top_p=0.51)) == 3
    assert kept(SamplingParams(min_p=1.0)) == 4  # every token has the top probability: min_p keeps what reaches it
    assert kept(SamplingParams(top_k=4)) == 4 and kept(SamplingParams(top_k=5)) == 4 and kept(SamplingParams(top_k=-1)) == 4


def test_top_p_of_one_keeps_every_token_however_unlikely() -> None:
    logits = torch.linspace(0, -20, 1000)  # in float32 the sorted cumulative sum passes 1 before the tail ends
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=1.0))).all()


def test_min_p_scales_with_the_top_probability() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.4))).tolist() == [True, True, False]  # 0.24 cut
    assert torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.6))).tolist() == [True, False, False]  # 0.36 cut


def test_raw_log_probs_are_kept_only_for_rows_that_ask_even_for_zero() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0, logprobs=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    out = Sampler()(logits, params, [[1], [0]], [1, 1], [None, None], [[], []])
    assert out.token_ids == [3, 0]  # the penalty halves token 1's logit in the first row
    assert torch.equal(out.logprobs[0], torch.log_softmax(logits[0], -1)) and out.logprobs[1] is None


def test_a_banned_token_is_not_chosen_while_another_is_allowed() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0)], [[0]], [1], [None], [[1, 3]])
    assert out.token_ids == [2]
    allowed = [torch.tensor([True, True, False, True])]
    assert Sampler()(logits, [SamplingParams(temperature=0)], [[0]], [1], [None], [[1]], allowed).token_ids == [3]


def test_draws_follow_the_distribution() -> None:
    sampler = Sampler(seed=0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    counts = torch.bincount(torch.tensor([sampler.draw(probs, None) for _ in range(8000)]), minlength=5) / 8000
    assert torch.allclose(counts, probs, atol=0.02), counts  # argmax(p * E) instead gives about 0.45 and 0.05 at the ends
    assert all(sampler.draw(torch.tensor([0.0, 0.0, 1.0]), None) == 2 for _ in range(20))


def test_a_rows_generator_or_else_the_samplers_seed_decides_the_draws() -> None:
    probs = torch.full((50,), 0.02)
    draws = lambda s, g: [s.draw(probs, g) for _ in range(10)]  # noqa: E731
    assert draws(Sampler(seed=5), None) == draws(Sampler(seed=5), None)
    assert draws(Sampler(), None) == draws(Sampler(seed=0), None)  # the default seed is 0
    assert draws(Sampler(seed=5), None) != draws(Sampler(seed=6), None)
    own = draws(Sampler(seed=5), torch.Generator().manual_seed(9))
    assert own == draws(Sampler(seed=6), torch.Generator().manual_seed(9)) and own != draws(Sampler(seed=5), None)
    assert Sampler(seed=3).uniform(None) == float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    assert Sampler(seed=3).uniform(torch.Generator().manual_seed(4)) == float(
        torch.rand((), generator=torch.Generator().manual_seed(4)))


def test_a_sampled_row_draws_from_its_filtered_distribution() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    p = SamplingParams(temperature=1.0, top_k=1, seed=0)
    assert [Sampler(seed=s)(logits, [p], [[0]], [1], [None], [[]]).token_ids for s in range(5)] == [[1]] * 5
    flat = torch.zeros(1, 50)
    drawn = {Sampler(seed=s)(flat, [SamplingParams()], [[0]], [1], [None], [[]]).token_ids[0] for s in range(10)}
    assert len(drawn) > 1  # not the argmax every time


def test_a_seeded_row_draws_from_its_own_generator_in_the_batch() -> None:
    flat = torch.zeros(1, 50)
    tokens = [Sampler(seed=s)(flat, [SamplingParams(seed=7)], [[0]], [1], [torch.Generator().manual_seed(7)], [[]]).token_ids
              for s in range(5)]
    assert tokens == [[Sampler().draw(torch.full((50,), 0.02), torch.Generator().manual_seed(7))]] * 5


def test_penalties_apply_to_the_rows_own_tokens_and_prompt_length() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    params = [SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(temperature=0, presence_penalty=0.5)]
    out = Sampler()(logits, params, [[0, 0], [0, 0]], [1, 2], [None, None], [[], []])
    assert out.token_ids == [1, 0]  # row 0 generated token 0 (penalised to 1.5); row 1 has only its prompt


def test_top_logprobs_list_the_chosen_once_when_it_is_among_the_top() -> None:
    lp = torch.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.0]), -1)
    assert top_logprobs(lp, chosen=3, n=2) == [(3, float(lp[3]), 2), (1, float(lp[1]), 1)]
    assert top_logprobs(lp, chosen=0, n=0) == [(0, float(lp[0]), 4)]
    assert top_logprobs(lp, chosen=0, n=1) == [(0, float(lp[0]), 4), (1, float(lp[1]), 1)]


def test_top_p_keeps_the_smallest_prefix_that_reaches_it_even_at_an_exact_tie() -> None:
    """Four equally likely tokens and top_p 0.5: the first two reach it, so two are kept (transformers' and vLLM's
    rule), not a third whose preceding mass only equals top_p."""
    kept = filter_logits(torch.zeros(4), SamplingParams(top_p=0.5)).isfinite()
    assert kept.sum().item() == 2
    kept = filter_logits(torch.tensor([2.0, 1.0, 0.0, -1.0]), SamplingParams(top_p=0.7)).isfinite()
    assert kept.tolist() == [True, True, False, False]  # 0.64 < 0.7, then 0.88 reaches it
