"""Speculative decoding: proposers that guess a sequence's next tokens, and the check that keeps the model's own.

A proposer offers k tokens after a sequence's last one; the next decode step computes them as k + 1 rows of
that sequence (each row one decode query over the paged cache, so each gets the arithmetic a plain decode
step gives it). Row i's logits are the model's distribution p_i for the token after proposal i - 1.
Proposals are point guesses (prompt lookup, or a draft model's greedy choice), so the check is rejection
sampling against a point mass: proposal d is kept with probability p(d), else the token is drawn from p
with d removed. Each kept token is exactly as likely as under plain decoding, and with greedy requests the
output is identical token for token: d is kept while it is p's argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmkernel.config import CacheConfig, EngineConfig, EngineConfigError, SpeculativeConfig
from lmkernel.engine.request import Request
from lmkernel.engine.sampling import Sampler, SamplingParams
from lmkernel.engine.scheduler import ScheduledChunk, SchedulerOutput
from lmkernel.memory.block_pool import BlockPool
from lmkernel.memory.kv_cache import allocate_kv_cache, bytes_per_block


@dataclass
class SpeculativeStats:
    """Counters since the engine started (read by `stats()`, the startup line and /metrics)."""

    checks: int = 0  # decode rows that carried proposals
    proposed: int = 0
    accepted: int = 0
    paused: int = 0  # decode rows that ran without proposals: the batch was full or the sequence's kept failing
    # Decode-only steps, those that checked proposals and those that did not: seconds and tokens gained.
    check_seconds: float = 0.0
    check_tokens: int = 0
    plain_seconds: float = 0.0
    plain_tokens: int = 0

    def time_step(self, checked: bool, seconds: float, tokens: int) -> None:
        if checked:
            self.check_seconds, self.check_tokens = self.check_seconds + seconds, self.check_tokens + tokens
        else:
            self.plain_seconds, self.plain_tokens = self.plain_seconds + seconds, self.plain_tokens + tokens

    @property
    def speedup(self) -> float:
        """Tokens a second of decode steps that checked proposals over those of plain decode steps (0 until
        both kinds ran): what speculation gave, measured on this engine's own traffic."""
        if not (self.check_seconds and self.plain_seconds and self.plain_tokens):
            return 0.0
        return (self.check_tokens / self.check_seconds) / (self.plain_tokens / self.plain_seconds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_check(self) -> float:
        """Tokens a sequence gained from one forward that checked its proposals (accepted + the model's own)."""
        return (self.accepted + self.checks) / self.checks if self.checks else 0.0

    def as_stats(self) -> dict[str, float | int]:
        return {"spec_checks": self.checks, "spec_proposed_tokens": self.proposed,
                "spec_accepted_tokens": self.accepted, "spec_paused_rows": self.paused,
                "spec_acceptance_rate": self.acceptance_rate, "spec_tokens_per_check": self.tokens_per_check,
                "spec_speedup": self.speedup}


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    request: Request,
    draft: Sequence[int],
    generator: torch.Generator | None,
    banned: Callable[[int], Sequence[int]],
    allowed: Callable[[int], torch.Tensor | None],
) -> list[int]:
    """The tokens a sequence gains from one checked step: the proposals kept, then one token of the model's.

    logits [len(draft) + 1, V]: row i scores the token after `request.token_ids` + draft[:i]. `banned(i)` and
    `allowed(i)`: the min_tokens ban and the grammar mask at row i, as plain decoding would apply them.
    """
    p: SamplingParams = request.sampling_params
    history = list(request.token_ids)
    logits = logits.float()
    for i in range(len(draft) + 1):
        x = sampler.prepare(logits[i], p, history, request.num_prompt_tokens, banned(i), allowed(i))
        proposal = draft[i] if i < len(draft) else None
        if p.greedy:
            token = int(torch.argmax(x))
            if token == proposal:
                history.append(token)
                continue
            return history[request.num_tokens :] + [token]
        probs = sampler.probs(x, p)
        if proposal is None:
            return history[request.num_tokens :] + [sampler.draw(probs, generator)]
        if sampler.uniform(generator) < float(probs[proposal]):
            history.append(proposal)
            continue
        rest = probs.clone()
        rest[proposal] = 0.0
        total = float(rest.sum())
        token = sampler.draw(rest / total, generator) if total > 0 else proposal
        return history[request.num_tokens :] + [token]
    raise AssertionError("unreachable: the last row always returns")


def lookup(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Prompt lookup: the up to k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens, for the longest n in [min_n, max_n] that occurred before; [] when none did."""
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = arr[length - n :]
        # Candidate starts of an earlier occurrence: where its first token matches (the tail itself excluded).
        starts = np.flatnonzero(arr[: length - n] == tail[0])
        for s in starts[::-1]:
            if np.array_equal(arr[s : s + n], tail):
                follow = arr[s + n : s + n + k]
                if follow.size:
                    return follow.tolist()
    return []


class NgramProposer:
    """Prompt lookup (`--speculative-model ngram`): proposals copied from the sequence's own prompt and output,
    which pays where the answer repeats its context (editing code, quoting documents)."""

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max

    def propose(self, requests: Sequence[Request], counts: Sequence[int]) -> list[list[int]]:
        return [lookup(r.token_ids, self.min_n, self.max_n, k) for r, k in zip(requests, counts)]

    def drop(self, request_id: str) -> None:
        """Nothing is kept per sequence."""

    def describe(self) -> str:
        return f"prompt lookup (n-grams of {self.min_n}-{self.max_n})"


class DraftProposer:
    """A smaller model of the same vocabulary proposes its greedy continuation. It runs on its own paged cache
    (as many tokens as the target's) through its own `ModelRunner`; what it computed for a sequence stays
    until the sequence's tokens part from it, so each step it computes only the tokens it has not seen."""

    def __init__(self, runner: object, num_tokens: int, block_size: int) -> None:
        self.runner = runner  # a ModelRunner over the draft model
        self.pool = BlockPool(max(1, -(-num_tokens // block_size)), block_size, enable_prefix_caching=False)
        self.seen: dict[str, list[int]] = {}  # per sequence: the tokens whose K/V are in the draft's cache

    @classmethod
    def build(cls, name: str, config: EngineConfig, target_vocab: int, target_tokenizer: object,
              num_tokens: int) -> DraftProposer:
        """Load the draft model `name` as the engine loads its model, checking that it shares the vocabulary."""
        from lmkernel.engine.model_runner import ModelRunner
        from lmkernel.loading import load_model

        loaded = load_model(name, dtype=config.dtype, device=config.device, quantization=config.quantization,
                            packed_cache=config.packed_cache)
        if loaded.config.is_encoder:
            raise EngineConfigError(f"--speculative-model {name}: an encoder model cannot propose tokens")
        probe = "def f(x):\n    return x + 1  # Hello, world! Ünïcode 你好"
        if loaded.config.vocab_size != target_vocab or loaded.tokenizer.encode(probe) != target_tokenizer.encode(probe):
            raise EngineConfigError(
                f"--speculative-model {name}: a draft model must share the target's vocabulary (its tokenizer and "
                f"{target_vocab} token ids); this one has {loaded.config.vocab_size} ids or tokenizes differently")
        per_block = bytes_per_block(loaded.config, config.block_size, loaded.dtype)
        blocks = max(1, -(-num_tokens // config.block_size))
        cache = allocate_kv_cache(loaded.config, CacheConfig(config.block_size, blocks * per_block, 1.0, False, hybrid=False),
                                  loaded.dtype, loaded.device)
        draft_config = dataclasses.replace(config, speculative=None)
        runner = ModelRunner(loaded.model, cache, loaded.tokenizer, loaded.device, draft_config)
        return cls(runner, cache.num_blocks * config.block_size, config.block_size)

    def propose(self, requests: Sequence[Request], counts: Sequence[int]) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in requests]
        live: list[tuple[int, Request, int]] = []  # (index, the draft's view of the sequence, proposals wanted)
        chunks: list[ScheduledChunk] = []
        for i, (request, k) in enumerate(zip(requests, counts)):
            rid, tokens = request.request_id, request.token_ids
            seen = self.seen.get(rid, [])
            have = min(_common_prefix(seen, tokens), len(tokens) - 1)
            self.pool.trim(rid, have)
            if not self.pool.allocate(rid, tokens, len(tokens) + k - 1):
                self.drop(rid)  # no room in the draft's cache: this sequence goes without proposals
                continue
            view = Request(rid, list(tokens), request.sampling_params, 0)
            live.append((i, view, k))
            chunks.append(ScheduledChunk(view, have, len(tokens) - have, (self.pool.block_table(rid),), True))
        views = [view for _, view, _ in live]
        while chunks:  # one forward a proposal, every sequence still proposing in it
            tokens = self.runner.last_logits(SchedulerOutput(chunks)).argmax(-1).tolist()
            chunks, still = [], []
            for (i, view, k), token in zip(live, tokens):
                proposals[i].append(token)
                if len(proposals[i]) < k:
                    view.token_ids.append(token)
                    chunks.append(ScheduledChunk(view, view.num_tokens - 1, 1, (self.pool.block_table(view.request_id),), True))
                    still.append((i, view, k))
            live = still
        for view in views:  # its cache now holds the sequence and every proposal but the last
            self.seen[view.request_id] = view.token_ids
        return proposals

    def drop(self, request_id: str) -> None:
        self.pool.free(request_id)
        self.seen.pop(request_id, None)

    def describe(self) -> str:
        return "draft model"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Backoff:
    """One sequence's recent gain (tokens a check gave it); proposals pause for a while when it stays below
    what a check costs."""

    gain: float
    pause: int = 0  # steps left without proposals
    next_pause: int = 4


# The most rows a decode step may have for each row to get the arithmetic of a lone decode row: from 8 rows
# on, k-quant activations lose their low bits (csrc/gguf_blocks.h BATCH_ACT_ROWS), so proposals are handed
# out only while the step's rows stay below that.
EXACT_ROWS = 7
# With several sequences, proposals fill the step only up to this many rows: the CPU kernels run rows four
# at a time, and a fifth row starts another pass (`lmk bench decode-steps`: 4 rows cost 1.6 rows' time, 5
# rows 2.7), which several sequences' checks rarely pay back.
BATCH_CHECK_ROWS = 4


@dataclass
class Speculator:
    """Decides each step which decoding sequences get how many proposals, asks the proposer, and learns from
    what was kept. Pauses while the batch is fuller than `disable_by_batch_size`, while prompts are being
    computed (a step with a prompt chunk runs every row through the prompt kernels), for a sequence near its
    max_tokens or the context's end, and for a sequence whose checks give it fewer tokens than a check costs
    (the time of a step that checks proposals over that of a plain decode step, measured as the engine runs),
    retrying after a pause that doubles each time. A step's rows (one a sequence, plus its proposals) stay
    within `EXACT_ROWS` for one sequence and `BATCH_CHECK_ROWS` for several."""

    spec: SpeculativeConfig
    proposer: NgramProposer | DraftProposer
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    backoff: dict[str, _Backoff] = field(default_factory=dict)
    # Seconds of a decode step with checks and of one without (moving averages; None until measured), and
    # the cost of a check in plain steps assumed until both are: 4 rows of a step cost ~1.6 rows on CPU.
    check_step: float | None = None
    plain_step: float | None = None
    assumed_cost: float = 1.6

    @property
    def check_cost(self) -> float:
        """What a check costs, in plain decode steps."""
        if self.check_step is None or self.plain_step is None:
            return self.assumed_cost
        return self.check_step / self.plain_step

    def time_step(self, checked: bool, seconds: float, tokens: int) -> None:
        """Count a decode-only step's time (with or without checks) and the tokens it gave."""
        self.stats.time_step(checked, seconds, tokens)
        if checked:
            self.check_step = seconds if self.check_step is None else 0.9 * self.check_step + 0.1 * seconds
        else:
            self.plain_step = seconds if self.plain_step is None else 0.9 * self.plain_step + 0.1 * seconds

    def _state(self, request_id: str) -> _Backoff:
        return self.backoff.setdefault(request_id, _Backoff(gain=self.spec.num_speculative_tokens + 1.0))

    def propose(self, decoding: Sequence[Request], running: int, max_model_len: int,
                prompts_pending: bool) -> dict[str, list[int]]:
        """Proposals to follow each decoding request's last token (none where this step runs it plainly)."""
        if running > self.spec.disable_by_batch_size or prompts_pending:
            self.stats.paused += len(decoding)
            return {}
        asked, counts = [], []
        spare_rows = (EXACT_ROWS if len(decoding) == 1 else BATCH_CHECK_ROWS) - len(decoding)
        for r in decoding:
            state = self._state(r.request_id)
            room = min(r.sampling_params.max_tokens - r.num_output_tokens, max_model_len - r.num_tokens) - 1
            k = min(self.spec.num_speculative_tokens, room, spare_rows)
            if state.pause > 0 or k < 1:
                state.pause = max(state.pause - 1, 0)
                self.stats.paused += 1
                continue
            asked.append(r)
            counts.append(k)
            spare_rows -= k
        drafts = self.proposer.propose(asked, counts) if asked else []
        return {r.request_id: list(draft) for r, draft in zip(asked, drafts) if len(draft)}

    def learn_step(self, chunks: Sequence[ScheduledChunk], sampled: dict[str, list[int]], seconds: float) -> None:
        """Learn what each check of a step kept, and time decode-only steps with and without checks (the
        proposer's time counted in)."""
        for chunk in chunks:
            if chunk.draft and chunk.request.request_id in sampled:
                self.learn(chunk.request, len(chunk.draft), len(sampled[chunk.request.request_id]) - 1)
        if all(c.draft or c.num_tokens == 1 for c in chunks):
            self.time_step(any(c.draft for c in chunks), seconds, sum(len(t) for t in sampled.values()))

    def learn(self, request: Request, proposed: int, accepted: int) -> None:
        """Count one check of `proposed` proposals of which `accepted` were kept."""
        self.stats.checks += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        state = self._state(request.request_id)
        state.gain = 0.5 * state.gain + 0.5 * (accepted + 1)
        cost = self.check_cost
        if state.gain < cost:
            state.pause, state.next_pause = state.next_pause, min(2 * state.next_pause, 64)
            state.gain = cost + 0.5  # after the pause, one more try
        elif accepted == proposed:
            state.next_pause = 4

    def drop(self, request_id: str) -> None:
        self.backoff.pop(request_id, None)
        self.proposer.drop(request_id)

    def describe(self) -> str:
        return f"{self.proposer.describe()}, {self.spec.num_speculative_tokens} tokens"


def build_speculator(config: EngineConfig, target_vocab: int, tokenizer: object, num_tokens: int) -> Speculator | None:
    """The engine's speculator for `config.speculative`, or None when speculation is off."""
    spec = config.speculative
    if spec is None:
        return None
    proposer = NgramProposer(spec) if spec.is_ngram else DraftProposer.build(spec.model, config, target_vocab, tokenizer,
                                                                             num_tokens)
    return Speculator(spec, proposer)
