"""`SamplingParams` (what a request asks for) and the `Sampler` (logits in, tokens and log-probs out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmkernel.engine.structured import StructuredOutputs

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; the fields and defaults follow vLLM's."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    lora: str | None = None  # the name of a LoRA adapter the engine serves; None: the base model
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must match (or its fields as a dict)

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)
        self._check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
                    "structured_outputs", "None, a StructuredOutputs or a dict of its fields")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        self._check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens", "an integer >= 1 or None",
        )
        self._check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        self._check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})"
        )
        self._check(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]")
        self._check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1, 0 (all tokens) or a positive integer")
        self._check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        self._check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        self._check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "in (0, 10]")
        self._check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]")
        self._check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]")
        self._check(self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63), "seed",
                    "an integer in [-2^63, 2^63) or None")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")
        self._check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids >= 0")
        self._check(self.lora is None or (isinstance(self.lora, str) and bool(self.lora)), "lora",
                    "None or the name of a served LoRA adapter")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            self._check(
                value is None or (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS), name, f"None or 0..{_MAX_LOGPROBS}"
            )

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"SamplingParams.{name} must be {expected}; got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class SamplerOutput:
    """Per row: the chosen token, and (when asked) log-probabilities of the raw model distribution."""

    token_ids: list[int]
    logprobs: list[torch.Tensor | None]  # log-softmax of each row's raw logits, kept only when asked


def apply_penalties(logits: torch.Tensor, params: SamplingParams, token_ids: Sequence[int], num_prompt: int) -> torch.Tensor:
    """Repetition penalty over prompt and output; presence and frequency penalties over the output (in place)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(token_ids) > num_prompt:
        out = torch.tensor(token_ids[num_prompt:], dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks on one row."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """Turns each row of logits into a token with that request's parameters and random stream.

    A seeded request draws from its own generator, so its tokens do not depend on the batch it is in.
    """

    def __init__(self, seed: int = 0) -> None:
        self.default_generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        token_ids: Sequence[Sequence[int]],
        num_prompt: Sequence[int],
        generators: Sequence[torch.Generator | None],
        banned: Sequence[Sequence[int]],
        allowed: Sequence[torch.Tensor | None] | None = None,
    ) -> SamplerOutput:
        """`banned`: tokens a row may not take yet (min_tokens); `allowed`: where given, a row's grammar mask
        (bool over the vocabulary). Log-probs are those of the raw logits, as vLLM reports them."""
        logits = logits.float()
        chosen: list[int] = []
        keep: list[torch.Tensor | None] = []
        for row, p in enumerate(params):
            raw = logits[row]
            keep.append(torch.log_softmax(raw, -1) if p.logprobs is not None else None)
            x = self.prepare(raw, p, token_ids[row], num_prompt[row], banned[row], allowed[row] if allowed else None)
            chosen.append(int(torch.argmax(x)) if p.greedy else self.draw(self.probs(x, p), generators[row]))
        return SamplerOutput(chosen, keep)

    @staticmethod
    def prepare(raw: torch.Tensor, p: SamplingParams, token_ids: Sequence[int], num_prompt: int,
                banned: Sequence[int], allowed: torch.Tensor | None) -> torch.Tensor:
        """One row's logits as the request samples from them: grammar mask, min_tokens ban, penalties (a copy)."""
        x = raw.clone()
        if allowed is not None:
            x.masked_fill_(~allowed.to(x.device), float("-inf"))
        if banned:
            ban = list(banned)
            kept = x[ban].clone()
            x[ban] = float("-inf")
            if not torch.isfinite(x).any():  # the grammar allows nothing else: it wins over min_tokens
                x[ban] = kept
        return apply_penalties(x, p, token_ids, num_prompt)

    @staticmethod
    def probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """The distribution a non-greedy request draws from, after temperature, top-k, top-p and min-p."""
        return filter_logits(x, p).softmax(-1)

    def draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> int:
        """A token from `probs`, on the request's own random stream (else the sampler's)."""
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=generator or self.default_generator)
        return int(torch.argmax(probs.cpu() / noise))

    def uniform(self, generator: torch.Generator | None) -> float:
        """A number in [0, 1) from the request's own random stream (else the sampler's)."""
        return float(torch.rand((), generator=generator or self.default_generator))


def top_logprobs(logprobs: torch.Tensor, chosen: int, n: int) -> list[tuple[int, float, int]]:
    """(token, logprob, rank) for the chosen token and the n most likely ones, chosen first."""
    value = float(logprobs[chosen])
    rank = int((logprobs > value).sum()) + 1
    out = [(chosen, value, rank)]
    if n > 0:
        top = torch.topk(logprobs, n)
        for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            if t != chosen:
                out.append((t, v, r))
    return out
