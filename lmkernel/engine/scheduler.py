"""Decides, each step, which requests run and how many of their tokens.

The one rule: every request has `num_tokens` (prompt plus output so far) and `num_computed_tokens`
(those with K/V in the cache). Each step gives requests new tokens to compute, closing that gap,
under a budget of `max_num_batched_tokens` and `max_num_seqs`. A decode is a gap of one token; a
prefill is a larger gap, cut into chunks when the budget is short; a prefix-cache hit starts
`num_computed_tokens` above zero; a preempted request drops back to zero and closes the gap again. A
decode may carry speculative proposals (`schedule(drafts)`): its chunk then computes them too, and
`update` keeps the K/V of those the step accepted and gives back the blocks of the rest.
Running requests are served first, decodes before unfinished prefills, then waiting ones in order
of (priority, arrival). When blocks run out, the running request with the largest (priority,
arrival), the youngest, is preempted. No tensors here: memory is reached only through the `KVCacheManager`
(a block table per KV group: sliding-window layers give back blocks that left their window after each step).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lmkernel.config import SchedulerConfig
from lmkernel.engine.request import PositionLogprobs, Request, RequestStatus
from lmkernel.memory.kv_manager import CachedPrefix, KVCacheManager


@dataclass
class ScheduledChunk:
    """One request's share of a step: tokens [start, start + num_tokens) and the blocks that hold them (a table
    per KV group)."""

    request: Request
    start: int
    num_tokens: int
    block_tables: tuple[list[int], ...]
    samples: bool  # the chunk reaches the last known token, so the step yields the next one
    draft: list[int] = field(default_factory=list)  # proposals after the last known token, checked in this step

    @property
    def token_ids(self) -> list[int]:
        """The tokens the chunk computes: known ones, then its proposals."""
        return self.request.token_ids[self.start : self.start + self.num_tokens - len(self.draft)] + self.draft


@dataclass
class SchedulerOutput:
    """The step's plan: chunks to compute (decodes first), and requests preempted to make room."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Continuous batching over a `KVCacheManager`: `schedule()` plans a step, `update()` takes its results."""

    def __init__(self, config: SchedulerConfig, pool: KVCacheManager) -> None:
        self.config, self.pool = config, pool
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def max_tokens_per_request(self) -> int:
        """Tokens one request may ever hold: the context length, and the whole cache."""
        return self.pool.max_tokens(self.config.max_model_len, self.config.max_num_batched_tokens)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id '{request.request_id}' is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request in any state: its blocks go back to the pool at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request_id)
        request.status = status
        return request

    def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> SchedulerOutput:
        """The step's plan; `drafts`: speculative proposals to follow a decoding request's last token."""
        out = SchedulerOutput()
        drafts = drafts or {}
        budget = self.config.max_num_batched_tokens
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        # Beside decodes, prompt chunks share a smaller budget, so the decodes' next token is not held up by
        # a whole step of prompt tokens.
        cap = self.config.prefill_tokens_with_decodes
        prefill_budget = min(budget, cap) if decodes and cap is not None else budget
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining > 1 and prefill_budget <= 0:
                continue
            draft = list(drafts.get(request.request_id, ()))[: budget - 1] if remaining == 1 else []
            if draft and not self.pool.can_allocate(request.request_id, request.num_tokens + len(draft)):
                draft = []  # proposals never take blocks another sequence needs
            num_new = min(remaining, budget if remaining == 1 else min(budget, prefill_budget)) + len(draft)
            target = request.num_computed_tokens + num_new
            while not self.pool.allocate(request.request_id, request.token_ids, target, salt=request.cache_salt):
                victim = max(self.running, key=lambda r: (r.priority, r.arrival_order))
                budget += self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.chunks.append(self._chunk(request, request.num_computed_tokens, num_new, draft))
                budget -= num_new
                if remaining > 1:
                    prefill_budget -= num_new
        if not out.preempted:
            self._admit_waiting(out, min(budget, prefill_budget))
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = CachedPrefix()
            if request.num_computed_tokens == 0 and not request.wants_prompt_logprobs:
                cached = self.pool.find_cached_prefix(request.token_ids, request.cache_salt)
            computed = cached.num_tokens
            num_new = min(request.num_tokens - computed, budget)
            if not self.pool.allocate(request.request_id, request.token_ids, computed + num_new, cached, request.cache_salt):
                break
            self.waiting.pop(0)
            request.num_computed_tokens = computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(self._chunk(request, computed, num_new))
            budget -= num_new
        return budget

    def _chunk(self, request: Request, start: int, num_tokens: int, draft: list[int] | None = None) -> ScheduledChunk:
        tables = self.pool.block_tables(request.request_id)
        draft = list(draft or [])
        return ScheduledChunk(request, start, num_tokens, tables, start + num_tokens - len(draft) == request.num_tokens,
                              draft)

    def update(self, out: SchedulerOutput, sampled: Mapping[str, Sequence[int]],
               logprobs: Mapping[str, Sequence[PositionLogprobs]] | None = None,
               prompt_logprobs: Mapping[str, Sequence[PositionLogprobs]] | None = None) -> None:
        """Advance each scheduled request by the tokens computed and append the tokens its step produced: one
        sampled token, after the proposals it accepted when its chunk carried some (whose K/V stay; the blocks
        of the rejected ones go back to the pool); and the logprobs the step computed for them."""
        for chunk in out.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished (aborted) while the step ran
            tokens = sampled.get(request.request_id, ())
            request.prompt_logprobs.extend((prompt_logprobs or {}).get(request.request_id, ()))
            request.logprobs.extend((logprobs or {}).get(request.request_id, ())[: len(tokens)])
            accepted = max(len(tokens) - 1, 0) if chunk.draft else 0
            request.num_computed_tokens = chunk.start + chunk.num_tokens - len(chunk.draft) + accepted
            request.token_ids.extend(tokens)
            if chunk.draft:
                self.pool.trim(request.request_id, request.num_tokens)
            self.pool.computed(request.request_id, request.num_computed_tokens)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> int:
        """Free the victim's blocks and send it back to wait; returns budget given back by its chunk."""
        self.pool.free(victim.request_id, computed_tokens=victim.num_computed_tokens)
        self.running.remove(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(victim.request_id)
        self._enqueue(victim)
        returned = 0
        for chunk in list(out.chunks):
            if chunk.request is victim:
                out.chunks.remove(chunk)
                returned += chunk.num_tokens
        return returned

    def _enqueue(self, request: Request) -> None:
        key = (request.priority, request.arrival_order)
        index = next((i for i, r in enumerate(self.waiting) if (r.priority, r.arrival_order) > key), len(self.waiting))
        self.waiting.insert(index, request)
