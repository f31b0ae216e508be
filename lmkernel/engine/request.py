"""A request's state inside the engine, and the outputs handed back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from lmkernel.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token, its rank in the distribution (1 = most likely), and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position's log-probabilities: the chosen (or prompt) token plus the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass(frozen=True)
class CheckedPrompt:
    """A prompt the engine has judged (`LLMEngine.check_prompt`): its ids and its SamplingParams with max_tokens
    filled in. `add_request` takes it as it is, so a prompt checked at admission is not checked again."""

    ids: tuple[int, ...]
    params: SamplingParams
    text: str | None = None

    @property
    def most_tokens(self) -> int:
        """Prompt plus every sample's max_tokens: the most it can cost."""
        return len(self.ids) + (self.params.max_tokens or 0) * self.params.n


@dataclass(eq=False)
class Request:
    """One sequence being generated: its tokens, how many have K/V computed, and its sampling state. Made by
    the engine; from then on the scheduler alone changes it (`schedule`, `update`, `finish`).

    `token_ids` holds the prompt followed by the generated tokens; `num_computed_tokens` of them have
    K/V in the cache. The scheduler's one rule is to close that gap under the step's budget.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_order: int
    priority: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when the scheduler first gave it tokens
    matcher: Any = None  # structured output: the llguidance matcher its tokens must pass
    adapter_salt: str = ""  # the LoRA adapter it uses, as loaded (name and load)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def cache_salt(self) -> str:
        """Mixed into the prefix-cache keys: K/V computed under a LoRA adapter are that load of it alone
        (an adapter unloaded and loaded again under the same name shares nothing with the old one)."""
        return self.adapter_salt

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None


@dataclass
class CoreOutput:
    """What one engine step did for one sequence: the tokens it kept and their log-probs, prompt log-probs
    scored, and its end where its tokens say (`finish_reason` "stop" or "length"; `stop_reason`: the stop token)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None
    queue_seconds: float | None = None  # arrival to first scheduled step


def token_end(request: Request, token: int, produced: int, eos_ids: frozenset[int],
              max_model_len: int) -> tuple[str, int | None] | None:
    """Where a sequence's new token ends it, by tokens alone: an end-of-sequence or stop token (after min_tokens),
    max_tokens, the context, or its grammar complete (the token is fed to the grammar). `produced`: its output
    tokens with this one. (finish_reason, stop token) or None."""
    params = request.sampling_params
    enough = produced >= params.min_tokens
    end: tuple[str, int | None] | None = None
    if enough and token in eos_ids and not params.ignore_eos:
        end = ("stop", None)
    elif enough and token in params.stop_token_ids:
        end = ("stop", token)
    elif produced >= (params.max_tokens or 0) or request.num_prompt_tokens + produced >= max_model_len:
        end = ("length", None)
    if request.matcher is not None:
        accepted = request.matcher.consume_token(token)
        if end is None and (not accepted or request.matcher.is_stopped()):
            end = ("stop", None)
    return end


@dataclass
class CompletionOutput:
    """One sample of a request: text and ids so far, plus what this step added (`delta_*`)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What a caller gets back for one request (all its samples), vLLM's shape."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    queue_seconds: float | None = None  # arrival to first scheduled step, once it has been scheduled
