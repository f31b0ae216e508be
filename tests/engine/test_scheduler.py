"""Scheduler without a model: budgets, decode priority, chunked prefill, preemption order, abort."""

from __future__ import annotations

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
