"""Scheduler without a model: budgets, decode priority, chunked prefill, preemption order, abort."""

from __future__ import annotations

import pytest

from lmkernel.config import SchedulerConfig
from lmkernel.engine.request import Request, RequestStatus
from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.scheduler import Scheduler
from lmkernel.memory.kv_manager import KVCacheManager

_order = iter(range(10**6))


def req(rid: str, n: int, priority: int = 0) -> Request:
    return Request(rid, list(range(1000, 1000 + n)), SamplingParams(max_tokens=50), next(_order), priority)


def run(s: Scheduler, sampled_token: int = 7):
    out = s.schedule()
    s.update(out, {c.request.request_id: [sampled_token] for c in out.chunks if c.samples})
    return out


def make(blocks=100, bs=4, budget=32, seqs=8, caching=False, beside_decodes=None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=10_000,
                                     prefill_tokens_with_decodes=beside_decodes), KVCacheManager(blocks, bs, (None,), caching))


def test_prompt_tokens_beside_decodes_are_capped_so_decodes_keep_their_pace():
    s = make(budget=64, blocks=200, beside_decodes=10)
    s.add_request(req("a", 30))
    s.add_request(req("b", 30))
    out = run(s)  # nothing decodes yet: the whole budget goes to prompts
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 30), ("b", 30)]
    s.add_request(req("c", 25))
    s.add_request(req("d", 25))
    out = run(s)  # two decodes, then at most 10 prompt tokens (running or newly admitted)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 1), ("c", 10)]
    out = run(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 1), ("c", 10)]
    out = run(s)  # c's last 5, then 5 of d's
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 1), ("c", 5), ("d", 5)]
    for rid in ("a", "b", "c"):
        s.finish(rid, RequestStatus.FINISHED_STOPPED)
    out = run(s)  # no decode left: d's remaining 20 in one step
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 20)]


def test_long_prompt_is_chunked_and_decodes_go_first():
    s = make(budget=16)
    s.add_request(req("short", 3))
    out = run(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("short", 3)]
    s.add_request(req("long", 40))
    out = run(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 15)]
    assert not out.chunks[1].samples
    out = run(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 15)]
    out = run(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 10)]
    assert out.chunks[1].samples and s.requests["long"].num_output_tokens == 1
    assert all(o.num_batched_tokens <= 16 for o in [out])


def test_budget_and_sequence_cap_hold():
    s = make(budget=20, seqs=3)
    for i in range(6):
        s.add_request(req(f"r{i}", 5))
    for _ in range(10):
        out = run(s)
        assert out.num_batched_tokens <= 20 and len(s.running) <= 3


def test_priority_then_arrival_order():
    s = make(budget=5)
    s.add_request(req("late-low", 5, priority=1))
    s.add_request(req("urgent", 5, priority=-1))
    s.add_request(req("normal", 5))
    assert [c.request.request_id for c in run(s).chunks] == ["urgent"]
    assert [r.request_id for r in s.waiting] == ["normal", "late-low"]


def test_youngest_is_preempted_when_blocks_run_out_and_recomputed_later():
    s = make(blocks=6, bs=4, budget=64)
    s.add_request(req("old", 8))  # 2 blocks
    s.add_request(req("young", 8))  # 2 blocks
    run(s)
    for _ in range(8):  # each grows to 3 blocks, then needs more than 6 together
        out = run(s)
        if out.preempted:
            break
    assert out.preempted == ["young"] and s.num_preemptions == 1
    young = s.requests["young"]
    assert young.status is RequestStatus.WAITING and young.num_computed_tokens == 0
    assert young.num_output_tokens > 0  # its outputs are kept and recomputed
    assert [c.request.request_id for c in out.chunks] == ["old"]
    s.finish("old", RequestStatus.FINISHED_STOPPED)
    total = young.num_tokens
    out = run(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("young", 0, total)]


def test_request_preempts_itself_when_it_is_the_youngest():
    s = make(blocks=4, bs=4, budget=64)
    s.add_request(req("a", 8))
    s.add_request(req("b", 7))
    run(s)
    for _ in range(6):
        out = run(s)
        if out.preempted:
            break
    assert out.preempted == ["b"] and [c.request.request_id for c in out.chunks] == ["a"]


def test_abort_in_every_state_frees_blocks():
    s = make(blocks=20, bs=4, budget=8)
    s.add_request(req("waiting", 4))
    s.add_request(req("running", 20))
    s.add_request(req("queued", 4))
    run(s)  # "waiting" runs, "running" prefills partly
    assert s.finish("queued", RequestStatus.FINISHED_ABORTED).status is RequestStatus.FINISHED_ABORTED
    s.finish("running", RequestStatus.FINISHED_ABORTED)
    s.finish("waiting", RequestStatus.FINISHED_ABORTED)
    assert s.finish("unknown", RequestStatus.FINISHED_ABORTED) is None
    assert not s.has_unfinished() and s.pool.num_free_blocks == 20


def test_prefix_hit_starts_computed_tokens_above_zero():
    s = make(blocks=50, bs=4, budget=64, caching=True)
    s.add_request(req("first", 18))
    run(s)
    s.add_request(req("second", 18))
    out = run(s)
    chunk = next(c for c in out.chunks if c.request.request_id == "second")
    assert chunk.start == 16 and chunk.num_tokens == 2


def test_a_decode_carries_its_proposals_and_update_keeps_only_the_accepted():
    s = make(blocks=20, bs=4, budget=32)
    a = req("a", 6)
    s.add_request(a)
    run(s)  # prefill: 6 computed, one token sampled
    out = s.schedule({"a": [11, 12, 13]})
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_tokens, chunk.draft) == (6, 4, [11, 12, 13])
    assert chunk.token_ids == [7, 11, 12, 13]
    assert len(s.pool.block_table("a")) == 3  # room for 10 tokens
    s.update(out, {"a": [11, 5]})  # the first proposal kept, then the model's own token
    assert a.token_ids[-3:] == [7, 11, 5] and a.num_computed_tokens == 8 and a.num_tokens == 9
    assert len(s.pool.block_table("a")) == 3  # 9 tokens still need 3 blocks
    out = s.schedule({"a": [1, 2, 3]})
    s.update(out, {"a": [4]})  # nothing kept
    assert a.num_computed_tokens == 9 and a.num_tokens == 10 and len(s.pool.block_table("a")) == 3


def test_proposals_fit_the_budget_and_never_take_blocks_from_others():
    s = make(blocks=3, bs=4, budget=3)
    a = req("a", 2)
    s.add_request(a)
    run(s)
    (chunk,) = s.schedule({"a": [1, 2, 3, 4, 5]}).chunks
    assert chunk.draft == [1, 2]  # a budget of 3 tokens: one known, two proposed
    s2 = make(blocks=1, bs=4, budget=32)
    b = req("b", 3)
    s2.add_request(b)
    run(s2)
    (chunk,) = s2.schedule({"b": [1, 2, 3]}).chunks
    assert chunk.draft == [] and chunk.num_tokens == 1  # the proposals would need a second block: none free


def chunks(out) -> list[tuple[str, int]]:
    return [(c.request.request_id, c.num_tokens) for c in out.chunks]


def test_a_request_id_is_taken_once():
    s = make()
    s.add_request(req("a", 3))
    with pytest.raises(ValueError, match="^request id 'a' is already in use$"):
        s.add_request(req("a", 5))
    assert [r.num_tokens for r in s.waiting] == [3]


def test_unfinished_while_any_request_waits_or_runs():
    s = make(budget=4)
    assert not s.has_unfinished()
    s.add_request(req("a", 3))
    assert s.has_unfinished() and not s.running  # waiting only
    run(s)
    assert s.has_unfinished() and not s.waiting  # running only
    s.finish("a", RequestStatus.FINISHED_STOPPED)
    assert not s.has_unfinished()


def test_the_longest_request_fits_the_context_and_the_cache_of_every_group():
    assert make(blocks=10, bs=4).max_tokens_per_request() == 40  # the whole cache
    assert Scheduler(SchedulerConfig(max_model_len=30), KVCacheManager(10, 4, (None,), False)).max_tokens_per_request() == 30
    # A sliding group of window 8 holds at most (8 - 1 + chunk) tokens' blocks plus one: 4 blocks for chunks of 4,
    # 7 for chunks of 16, so the full group keeps 6 or 5 of the 10 blocks.
    for budget, longest in ((4, 24), (16, 20)):
        s = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_model_len=10_000),
                      KVCacheManager(10, 4, (None, 8), False))
        assert s.max_tokens_per_request() == longest


def test_a_prompt_two_tokens_short_of_done_is_still_scheduled():
    s = make(budget=8)
    s.add_request(req("a", 10))
    assert chunks(run(s)) == [("a", 8)]
    out = run(s)
    assert chunks(out) == [("a", 2)] and out.chunks[0].samples


def test_a_leftover_budget_of_one_token_still_admits_and_decodes():
    s = make(budget=5)
    s.add_request(req("a", 4))
    s.add_request(req("b", 3))
    assert chunks(run(s)) == [("a", 4), ("b", 1)]
    s = make(budget=3)
    for rid in "abc":
        s.add_request(req(rid, 1))
    run(s)
    assert chunks(run(s)) == [("a", 1), ("b", 1), ("c", 1)]
    out = s.schedule({"a": [5]})  # a takes two tokens: one left for b, none for c
    assert chunks(out) == [("a", 2), ("b", 1)] and out.chunks[0].draft == [5]
    s.update(out, {"a": [5, 6], "b": [6]})
    out = s.schedule({"a": [1, 2, 3, 4]})  # proposals up to the budget: one known token, two proposed
    assert chunks(out) == [("a", 3)] and out.chunks[0].draft == [1, 2] and out.chunks[0].samples


def test_without_room_beside_decodes_prompts_wait_and_decodes_still_run():
    s = make(budget=8, beside_decodes=0)
    s.add_request(req("a", 1))
    s.add_request(req("b", 9))
    assert chunks(run(s)) == [("a", 1), ("b", 7)]  # nothing decoded yet: the whole budget
    s.add_request(req("c", 4))
    assert chunks(run(s)) == [("a", 1)]  # b's last 2 and c wait while a decodes
    s.finish("a", RequestStatus.FINISHED_STOPPED)
    assert chunks(run(s)) == [("b", 2), ("c", 4)]


def test_one_prompt_token_beside_decodes_goes_to_the_first_prompt():
    s = make(budget=8, beside_decodes=1)
    s.add_request(req("a", 1))
    s.add_request(req("b", 9))
    run(s)
    assert chunks(run(s)) == [("a", 1), ("b", 1)]


def test_a_prompt_finishing_beside_decodes_leaves_the_rest_of_the_cap_to_the_next():
    s = make(budget=8, beside_decodes=4)
    s.add_request(req("a", 1))
    s.add_request(req("x", 9))
    assert chunks(run(s)) == [("a", 1), ("x", 7)]
    s.add_request(req("y", 20))
    assert chunks(run(s)) == [("a", 1), ("x", 2), ("y", 2)]


def test_proposals_go_only_to_decodes():
    s = make(budget=16)
    s.add_request(req("a", 20))
    assert chunks(run(s)) == [("a", 16)]
    out = s.schedule({"a": [1, 2]})  # still four prompt tokens to go
    assert chunks(out) == [("a", 4)] and out.chunks[0].draft == []


def test_proposals_may_use_the_requests_own_blocks_when_none_is_free():
    s = make(blocks=3, bs=4, budget=32)
    s.add_request(req("a", 5))
    run(s)
    s.add_request(req("b", 3))
    run(s)  # a: 7 tokens in 2 blocks; b takes the third
    out = s.schedule({"a": [9]})  # with the proposal a holds 8 tokens: its own two blocks
    assert chunks(out) == [("a", 2), ("b", 1)] and out.chunks[0].draft == [9] and out.chunks[0].samples


def test_rejected_proposals_give_their_blocks_back():
    s = make(blocks=4, bs=4, budget=32)
    a = req("a", 6)
    s.add_request(a)
    run(s)
    out = s.schedule({"a": [1, 2, 3, 4, 5]})  # 12 tokens: 3 blocks
    assert len(s.pool.block_table("a")) == 3
    s.update(out, {"a": [8]})  # none kept: 8 tokens need 2 blocks
    assert a.num_tokens == 8 and len(s.pool.block_table("a")) == 2 and s.pool.num_free_blocks == 2


def test_preempting_a_request_scheduled_earlier_in_the_step_gives_its_tokens_back():
    s = make(blocks=4, bs=16, budget=20)
    s.add_request(req("low", 16, priority=5))
    run(s)  # low: 17 tokens
    s.add_request(req("a", 16))
    s.add_request(req("p", 40))
    assert chunks(run(s)) == [("low", 1), ("a", 16), ("p", 3)]  # all four blocks taken
    out = run(s)  # low decodes first, then a needs a block: low (the least urgent) goes, and its token back to the budget
    assert out.preempted == ["low"] and chunks(out) == [("a", 1), ("p", 19)]
    assert s.requests["low"].num_preemptions == 1 and s.num_preemptions == 1


def test_a_request_preempted_earlier_in_the_step_is_skipped_and_the_rest_still_run():
    s = make(blocks=3, bs=16, budget=32)
    s.add_request(req("a", 15))
    s.add_request(req("v", 1, priority=5))
    run(s)
    s.add_request(req("b", 1))
    assert chunks(run(s)) == [("a", 1), ("v", 1), ("b", 1)]  # every block taken
    out = run(s)  # a's 17th token needs a block: v goes, and b (after v) still runs
    assert out.preempted == ["v"] and chunks(out) == [("a", 1), ("b", 1)]


def test_the_youngest_request_needing_a_block_preempts_itself_and_the_step_goes_on():
    s = make(blocks=2, bs=4, budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 4))
    run(s)
    out = run(s)
    assert out.preempted == ["b"] and chunks(out) == [("a", 1)]


def test_preemptions_are_counted_per_request_and_in_all():
    s = make(blocks=2, bs=4, budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 4))
    run(s)
    assert run(s).preempted == ["b"]  # b's fifth token needs a block: it is the youngest
    s.finish("a", RequestStatus.FINISHED_STOPPED)
    for _ in range(5):  # b alone again, until its ninth token needs a third block
        if run(s).preempted:
            break
    assert s.requests["b"].num_preemptions == 2 and s.num_preemptions == 2


def test_blocks_registered_by_a_preempted_step_are_not_found_by_others():
    s = make(blocks=5, bs=4, budget=32, caching=True)
    s.add_request(req("v", 3, priority=5))
    run(s)
    s.add_request(Request("a", list(range(2000, 2005)), SamplingParams(max_tokens=50), next(_order)))
    for _ in range(4):
        run(s)  # v: 8 tokens, 7 computed; a: 9 tokens, 8 computed
    v = s.requests["v"]
    assert (v.num_tokens, v.num_computed_tokens) == (8, 7)
    out = s.schedule({"v": [5]})  # v's chunk fills its second block (and a proposal takes the last free one),
    assert out.preempted == ["v"] and chunks(out) == [("a", 1)]  # then a needs a third: v goes, its chunk never run
    assert s.pool.find_cached_prefix(v.token_ids + [1]).num_tokens == 4


def test_prefix_hits_are_kept_apart_by_adapter():
    def salted(rid: str, salt: str) -> Request:
        r = req(rid, 18)
        r.token_ids = r.prompt_token_ids = list(range(1000, 1018))
        r.adapter_salt = salt
        return r

    s = make(blocks=50, bs=4, budget=64, caching=True)
    s.add_request(salted("first", "lora:a"))
    run(s)
    for rid, salt, start in (("other", "lora:b", 0), ("same", "lora:a", 16), ("base", "", 0)):
        s.add_request(salted(rid, salt))
        (chunk,) = [c for c in s.schedule().chunks if c.request.request_id == rid]
        assert chunk.start == start, rid
        assert s.requests[rid].num_computed_tokens == start


def test_a_prefix_hit_reads_the_blocks_that_hold_the_prefix():
    s = make(blocks=50, bs=4, budget=64, caching=True)
    s.add_request(req("first", 18))
    run(s)
    s.add_request(req("second", 18))
    run(s)
    assert s.pool.block_table("second")[:4] == s.pool.block_table("first")[:4]
    assert s.pool.block_table("second")[4] != s.pool.block_table("first")[4]


def test_blocks_a_decode_fills_are_cached_under_its_adapter():
    s = make(blocks=50, bs=4, budget=64, caching=True)
    a = req("a", 3)
    a.adapter_salt = "lora:a"
    s.add_request(a)
    run(s)
    run(s)  # the decode step fills the first block: it is registered then
    tokens = a.token_ids[:4] + [1, 2]
    assert s.pool.find_cached_prefix(tokens, "lora:a").num_tokens == 4
    assert s.pool.find_cached_prefix(tokens, "").num_tokens == 0


def test_a_request_that_wants_prompt_logprobs_computes_its_whole_prompt():
    s = make(blocks=50, bs=4, budget=64, caching=True)
    s.add_request(req("first", 18))
    run(s)
    second = Request("second", list(range(1000, 1018)), SamplingParams(max_tokens=5, prompt_logprobs=0), next(_order))
    s.add_request(second)
    (chunk,) = [c for c in s.schedule().chunks if c.request.request_id == "second"]
    assert (chunk.start, chunk.num_tokens) == (0, 18)


def test_first_scheduled_time_is_set_once():
    import time

    s = make(blocks=2, bs=4, budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 4))
    before = time.monotonic()
    run(s)
    b = s.requests["b"]
    first = b.first_scheduled_time
    assert first is not None and before <= first <= time.monotonic()
    assert run(s).preempted == ["b"]
    s.finish("a", RequestStatus.FINISHED_STOPPED)
    run(s)  # b again
    assert b.status is RequestStatus.RUNNING and b.first_scheduled_time == first


def test_update_skips_a_request_finished_during_the_step_and_advances_the_rest():
    s = make(budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    out = s.schedule()
    s.finish("a", RequestStatus.FINISHED_ABORTED)
    s.update(out, {"a": [7], "b": [8]})
    b = s.requests["b"]
    assert b.token_ids[-1] == 8 and b.num_computed_tokens == 3


def test_update_keeps_the_logprobs_of_the_tokens_it_appends():
    s = make(budget=32)
    a = req("a", 3)
    s.add_request(a)
    out = s.schedule()
    s.update(out, {"a": [7]}, logprobs={"a": [{7: -0.5}, {9: -1.0}]}, prompt_logprobs={"a": [None, {1: -2.0}]})
    assert a.logprobs == [{7: -0.5}] and a.prompt_logprobs == [None, {1: -2.0}]


def test_update_gives_sliding_window_blocks_back_as_the_window_moves():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_model_len=10_000), KVCacheManager(20, 4, (None, 8), False))
    s.add_request(req("a", 20))
    run(s)  # 20 computed: queries from 20 on read keys from 13 on, so the sliding group drops 3 blocks
    full, sliding = s.pool.block_tables("a")
    assert len(full) == 5 and sliding[:3] == [-1, -1, -1] and -1 not in sliding[3:]
