"""Runs one scheduled step: flattens its chunks into one varlen batch, runs the model on the paged
cache, and samples the next token of every request whose chunk reached its last known token."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from lmkernel.config import EngineConfig, EngineConfigError
from lmkernel.engine.adapters import LoraAdapters
from lmkernel.engine.attention_backends import AttentionBackend, FusedBackend, choose_backend
from lmkernel.engine.request import Logprob, PositionLogprobs, Request
from lmkernel.engine.sampling import Sampler, top_logprobs
from lmkernel.engine.scheduler import SchedulerOutput
from lmkernel.engine.speculative import verify
from lmkernel.layers import cpu_kernels
from lmkernel.layers.attention import AttentionMetadata, KVLayer, PagedLayout
from lmkernel.layers.lora import LoraRouting
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.memory.block_pool import NULL_BLOCK
from lmkernel.memory.kv_cache import KVCache
from lmkernel.models.interface import CausalLM

def select_cpu_path(config: EngineConfig) -> str | None:
    """Make `config.cpu_path` the process's CPU kernels where the engine runs on the CPU (an EngineConfigError
    if this machine cannot run it); None on CUDA."""
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        return None
    try:
        return cpu_kernels.select(config.cpu_path)
    except (RuntimeError, ValueError) as exc:
        raise EngineConfigError(f"--cpu-path {config.cpu_path}: {exc}") from None


@dataclass
class StepTimes:
    """Seconds the engine's steps spent in each phase since it started (read by `stats()` and /metrics, and by
    `lmk bench serve` to say where a step's time goes). A step with any prompt chunk counts as prefill."""

    schedule: float = 0.0
    forward_prefill: float = 0.0  # the model's forward in steps that carry prompt tokens (decodes ride along)
    forward_decode: float = 0.0  # the model's forward in decode-only steps
    logits: float = 0.0  # the output layer on the rows that need logits
    sampling: float = 0.0
    process: float = 0.0  # detokenizing, stop checks, grammars, building outputs
    prefill_steps: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0

    def as_stats(self) -> dict[str, float | int]:
        return {f"step_{f.name}" if f.type == "int" else f"step_{f.name}_seconds": getattr(self, f.name)
                for f in fields(self)}


@dataclass
class ModelRunnerOutput:
    """Per request id: the tokens the step gave it (one sampled token, after the proposals it kept when it
    checked some), their log-probs, and prompt log-probs for positions in this step."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


@dataclass
class RowPlan:
    """Which hidden rows of a step need logits, and what each is for: a request's next token (`sample_at`), the
    check of its proposals (`verify_at`: index in `rows`, the proposals), or its prompt's log-probs (`prompt_at`:
    index in `rows`, how many, first position). `slots`: each row's adapter slot, with adapters."""

    rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    sample_at: list[tuple[Request, int]] = field(default_factory=list)
    verify_at: list[tuple[Request, int, list[int]]] = field(default_factory=list)
    prompt_at: list[tuple[Request, int, int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, out: SchedulerOutput, chunk_slots: list[int]) -> RowPlan:
        plan, first = cls(), 0
        for i, chunk in enumerate(out.chunks):
            request = chunk.request
            if request.wants_prompt_logprobs:
                # Row for position p scores prompt token p + 1. The list opens with None (token 0 has no
                # score); positions scored before a preemption are not scored again.
                lo = max(chunk.start, len(request.prompt_logprobs) - 1)
                hi = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens - 1)
                if hi > lo:
                    plan.prompt_at.append((request, len(plan.rows), hi - lo, lo))
                    plan.rows.extend(range(first + lo - chunk.start, first + hi - chunk.start))
            if chunk.draft:
                plan.verify_at.append((request, len(plan.rows), chunk.draft))
                plan.rows.extend(range(first, first + chunk.num_tokens))
            elif chunk.samples:
                plan.sample_at.append((request, len(plan.rows)))
                plan.rows.append(first + chunk.num_tokens - 1)
            if chunk_slots:
                plan.slots.extend([chunk_slots[i]] * (len(plan.rows) - len(plan.slots)))
            first += chunk.num_tokens
        return plan


class ModelRunner:
    """Owns the model's forward on the KV cache, and the sampler; with `adapters`, routes each
    request's tokens to its LoRA adapter for the forward and the logits (the step's `LoraRouting`)."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, tokenizer: Tokenizer, device: torch.device,
                 config: EngineConfig, adapters: LoraAdapters | None = None,
                 eos_ids: frozenset[int] = frozenset()) -> None:
        self.model, self.kv_cache, self.tokenizer, self.device = model, kv_cache, tokenizer, device
        self.eos_ids = sorted(eos_ids)
        self.adapters = adapters
        self.kv_layers = [KVLayer(*kv_cache.layer(i), kv_cache.groups.place(i)[0]) for i in range(kv_cache.num_layers)]
        self.num_kv_groups = kv_cache.groups.num_groups
        self.sampler = Sampler(config.seed)
        self.generators: dict[str, torch.Generator] = {}
        if device.type == "cpu":
            cpu_kernels.build()
        # Chosen once: the model does not change under the engine. The fused step serves steps in which no
        # token uses an adapter (it runs the base layers); the others run the model's forward.
        self.backend = choose_backend(model, kv_cache, device, config.decode_backend, config.deterministic)
        self.decode_backend = self.backend.name
        self.deterministic = config.deterministic
        if self.deterministic:
            check_deterministic(self.backend, adapters)
        self.times = StepTimes()

    def add_generator(self, request_id: str, seed: int) -> None:
        self.generators[request_id] = torch.Generator().manual_seed(seed)

    def drop_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def layout(self, out: SchedulerOutput, lora: LoraRouting | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and attention metadata for the step's chunks laid end to end.

        A chunk carrying proposals runs as one single-token sequence a row: each row is a decode query over
        the paged cache (the arithmetic plain decoding gives it), reading the K/V that the rows before it
        wrote in the same layer. With `deterministic`, every chunk does: a prompt token is computed as it
        would be decoded, whatever chunk or batch it came in.
        """
        ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        lengths: list[int] = []
        tables: list[tuple[list[int], ...]] = []  # each sequence's block table in each KV group
        context: list[int] = []  # sequences that read earlier tokens back from the cache
        decode_seqs: list[int] = []
        for chunk in out.chunks:
            start, tokens = chunk.start, chunk.token_ids
            end = start + chunk.num_tokens
            pieces = [(p, p + 1) for p in range(start, end)] if chunk.draft or self.deterministic else [(start, end)]
            for s, e in pieces:
                i = len(lengths)
                ids.extend(tokens[s - start : e - start])
                positions.extend(range(s, e))
                seq_lens.append(e)
                lengths.append(e - s)
                tables.append(chunk.block_tables)
                if e - s == 1 and (s > 0 or self.deterministic):
                    decode_seqs.append(i)
                elif s > 0:
                    context.append(i)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        paged = tuple(self._paged_layout([_usable(t[g]) for t in tables], seq_lens, lengths, starts, decode_seqs, context)
                      for g in range(self.num_kv_groups))
        meta = AttentionMetadata.for_lengths(lengths, causal=True, paged=paged, lora=lora)
        return torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), meta

    def _paged_layout(self, tables: list[list[int]], seq_lens: list[int], lengths: list[int], starts: list[int],
                      decode_seqs: list[int], context: list[int]) -> PagedLayout:
        """Where the step's tokens live in one KV group's blocks (`tables`: each sequence's table there)."""
        bs = self.kv_cache.block_size
        slots = [table[p // bs] * bs + p % bs for table, e, n in zip(tables, seq_lens, lengths) for p in range(e - n, e)]
        return PagedLayout(
            slot_mapping=torch.tensor(slots, device=self.device),
            seq_lens=tuple(seq_lens),
            context_slots={i: self._context_slots(tables[i], seq_lens[i]) for i in context},
            decode=self.backend.decode(decode_seqs, starts, tables, seq_lens) if decode_seqs else None,
        )

    def _context_slots(self, table: list[int], length: int) -> torch.Tensor:
        bs = self.kv_cache.block_size
        pos = torch.arange(length)
        return (torch.tensor(table)[pos // bs] * bs + pos % bs).to(self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, allowed: Mapping[str, torch.Tensor] | None = None) -> ModelRunnerOutput:
        """Run the plan's chunks; `allowed`: per request id, the tokens its grammar allows next (bool [V])."""
        slots: list[int] = []  # each chunk's adapter slot, when some token uses an adapter
        if self.adapters is not None:
            slots = [self.adapters.slot(c.request.sampling_params.lora) for c in out.chunks]
            slots = slots if any(s >= 0 for s in slots) else []
        per_token = [s for s, c in zip(slots, out.chunks) for _ in range(c.num_tokens)]
        ids, positions, meta = self.layout(out, LoraRouting.of(per_token, self.device))
        hidden = self._timed_forward(out, ids, positions, meta, bool(slots))
        plan = RowPlan.of(out, slots)
        result = ModelRunnerOutput()
        if not plan.rows:
            return result
        logits = self._logits(hidden, plan)
        for request, at, count, start in plan.prompt_at:
            scored = torch.log_softmax(logits[at : at + count], -1)
            n = request.sampling_params.prompt_logprobs
            result.prompt_logprobs[request.request_id] = [
                self._position(scored[j], request.token_ids[start + j + 1], n) for j in range(count)
            ]
        start = time.perf_counter()
        self._sample(logits, plan.sample_at, allowed, result)
        for request, at, draft in plan.verify_at:
            result.sampled[request.request_id] = tokens = self._verify(request, logits[at : at + len(draft) + 1], draft,
                                                                       allowed.get(request.request_id) if allowed else None)
            n = request.sampling_params.logprobs
            if n is not None:
                result.logprobs[request.request_id] = [
                    self._position(torch.log_softmax(logits[at + j], -1), t, n) for j, t in enumerate(tokens)]
        self.times.sampling += time.perf_counter() - start
        return result

    def _timed_forward(self, out: SchedulerOutput, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       adapters: bool) -> torch.Tensor:
        """The step's forward, its time counted as prefill (any prompt token) or decode."""
        times, start = self.times, time.perf_counter()
        hidden = self._forward(ids, positions, meta, adapters)
        prompt = sum(c.num_tokens for c in out.chunks
                     if not c.draft and (c.num_tokens > 1 or c.start < c.request.num_prompt_tokens))
        now = time.perf_counter()
        if prompt:
            times.forward_prefill += now - start
            times.prefill_steps += 1
        else:
            times.forward_decode += now - start
            times.decode_steps += 1
        times.prompt_tokens += prompt
        times.decode_tokens += int(ids.shape[0]) - prompt
        return hidden

    def _logits(self, hidden: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        """Scores of the hidden rows the plan needs, each through its adapter."""
        every_row = plan.rows == list(range(hidden.shape[0]))  # a decode step: no rows to pick
        picked = hidden if every_row else hidden[torch.tensor(plan.rows, device=self.device)]
        start = time.perf_counter()
        if (plan.verify_at or self.deterministic) and picked.shape[0] > cpu_kernels.SMALL_LINEAR_MAX_ROWS:
            # Rows that check proposals (every row, when deterministic) get a lone decode row's output layer: the
            # few-row kernels, a few rows a call.
            step = cpu_kernels.SMALL_LINEAR_MAX_ROWS
            logits = torch.cat([self.model.compute_logits(picked[i : i + step],
                                                          LoraRouting.of(plan.slots[i : i + step], self.device)).float()
                                for i in range(0, picked.shape[0], step)])
        else:
            logits = self.model.compute_logits(picked, LoraRouting.of(plan.slots, self.device)).float()
        self.times.logits += time.perf_counter() - start
        return logits

    def _sample(self, logits: torch.Tensor, sample_at: list[tuple[Request, int]],
                allowed: Mapping[str, torch.Tensor] | None, result: ModelRunnerOutput) -> None:
        """The next token (and its log-probs) of each request whose chunk reached its last known token."""
        if not sample_at:
            return
        at_rows = [at for _, at in sample_at]
        sample_logits = logits if at_rows == list(range(logits.shape[0])) else logits[torch.tensor(at_rows, device=logits.device)]
        reqs = [r for r, _ in sample_at]
        sampled = self.sampler(
            sample_logits,
            [r.sampling_params for r in reqs],
            [r.token_ids for r in reqs],
            [r.num_prompt_tokens for r in reqs],
            [self.generators.get(r.request_id) for r in reqs],
            [self._banned(r) for r in reqs],
            [allowed.get(r.request_id) for r in reqs] if allowed else None,
        )
        for r, token, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
            result.sampled[r.request_id] = [token]
            if lp is not None:
                result.logprobs[r.request_id] = [self._position(lp, token, r.sampling_params.logprobs)]

    def _verify(self, request: Request, logits: torch.Tensor, draft: list[int], masks: torch.Tensor | None) -> list[int]:
        """The tokens a request keeps from a step that checked its proposals; `masks` [rows, V]: its grammar's
        allowed tokens after each kept proposal (the last mask stands for rows past a proposal it refuses)."""
        def allowed(i: int) -> torch.Tensor | None:
            return None if masks is None else masks[min(i, masks.shape[0] - 1)]

        return verify(self.sampler, logits, request, draft, self.generators.get(request.request_id),
                      lambda i: self._banned(request, i), allowed)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, adapters: bool) -> torch.Tensor:
        """Final hidden states of the step: the backend's own call where it covers the step, else the model's."""
        if self.backend.covers(int(ids.shape[0]), meta, adapters):
            return self.backend.forward(ids, positions, meta, self.kv_layers)
        return self.model(ids, positions, meta, self.kv_layers)

    @torch.inference_mode()
    def last_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [chunks, V] of each chunk's last token, nothing sampled (a draft model's proposals)."""
        ids, positions, meta = self.layout(out)
        hidden = self._forward(ids, positions, meta, False)
        last = torch.tensor(meta.cu_seqlens[1:], device=self.device) - 1
        return self.model.compute_logits(hidden[last]).float()

    def _banned(self, request: Request, ahead: int = 0) -> list[int]:
        """Tokens that may not end the output yet (min_tokens), `ahead` tokens past the request's last."""
        p = request.sampling_params
        if request.num_output_tokens + ahead >= p.min_tokens:
            return []
        return ([] if p.ignore_eos else self.eos_ids) + p.stop_token_ids

    def _position(self, logprobs: torch.Tensor, token: int, n: int) -> PositionLogprobs:
        return {
            t: Logprob(v, rank, self.tokenizer.decode([t])) for t, v, rank in top_logprobs(logprobs, token, n)
        }


def check_deterministic(backend: AttentionBackend, adapters: LoraAdapters | None) -> None:
    """Refuse `EngineConfig.deterministic` where its batch-invariant arithmetic cannot hold: it needs the fused
    CPU decode step (every token runs as one of its rows), which serves steps without adapters."""
    if not isinstance(backend, FusedBackend):
        raise EngineConfigError("--deterministic needs the fused CPU decode step (a Llama-family model, on CPU, in "
                                "float32, with --decode-backend auto or fused); this model or device has none")
    if adapters is not None:
        raise EngineConfigError("--deterministic does not cover LoRA adapters (their tokens run the model's own "
                                "forward); serve the adapters without it, or merge them: lmk lora merge")


def _usable(table: list[int]) -> list[int]:
    """A block table the kernels may follow: blocks a sliding group gave back read as block 0 (never attended to:
    they lie before every query's window)."""
    return [max(b, 0) for b in table] if NULL_BLOCK in table else table
