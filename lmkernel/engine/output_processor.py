"""What a request's sampled tokens become for its caller: text (incremental detokenization), the end of the
output (end-of-sequence and stop tokens, stop strings, max_tokens, the context, a finished grammar), and the
`RequestOutput` of each step, whose text holds back what may still turn into a stop string.

The scheduler appends the tokens these functions keep; they own everything a `Sample` says about its text and end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from lmkernel.engine.request import CompletionOutput, Request, RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loader.tokenizer import IncrementalDetokenizer


@dataclass
class Sample:
    """One of a request's n samples: its engine request and the text produced so far."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token or string that ended it


@dataclass
class Group:
    """A caller's request: its prompt and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Sample] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


def check_stop(sample: Sample, token: int, produced: int, eos_ids: Collection[int], max_model_len: int) -> None:
    """Add the token's text, and end the sample where its parameters say (min_tokens first). `produced`: its
    output tokens with this one."""
    request, params = sample.request, sample.request.sampling_params
    sample.text += sample.detokenizer.add(token)
    enough = produced >= params.min_tokens
    is_eos = token in eos_ids
    if enough and ((is_eos and not params.ignore_eos) or token in params.stop_token_ids):
        sample.finish_reason, sample.stop_reason = "stop", (None if is_eos and not params.ignore_eos else token)
        sample.text += sample.detokenizer.flush()
    elif enough and params.stop:
        window = max(map(len, params.stop)) + 8
        tail_from = max(0, len(sample.text) - window)
        hits = [(sample.text.find(s, tail_from), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, stop = min(hits)
            sample.text, sample.finish_reason, sample.stop_reason = sample.text[:at], "stop", stop
    if sample.finish_reason is None and (
        produced >= params.max_tokens or request.num_prompt_tokens + produced >= max_model_len
    ):
        sample.finish_reason = "length"
        sample.text += sample.detokenizer.flush()


def advance_grammar(sample: Sample, token: int) -> None:
    """Feed the token to the request's grammar; a complete grammar ends the output ("stop")."""
    matcher = sample.request.matcher
    accepted = matcher.consume_token(token)
    if sample.finish_reason is None and (not accepted or matcher.is_stopped()):
        sample.finish_reason = "stop"
        sample.text += sample.detokenizer.flush()


def group_output(group: Group) -> RequestOutput:
    """The group's output now: each sample's text and tokens, and what is new since the last one."""
    outputs = []
    hold = max(map(len, group.params.stop), default=1) - 1  # text that may still turn into a stop string
    for s in group.samples:
        r = s.request
        visible = len(s.text) if s.finish_reason else max(s.emitted_chars, len(s.text) - hold)
        tokens = r.output_token_ids
        outputs.append(
            CompletionOutput(
                index=s.index,
                text=s.text[:visible],
                token_ids=list(tokens),
                logprobs=list(r.logprobs) if r.sampling_params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                delta_text=s.text[s.emitted_chars : visible],
                delta_token_ids=list(tokens[s.emitted_tokens :]),
            )
        )
        s.emitted_chars, s.emitted_tokens = visible, len(tokens)
    first = group.samples[0].request
    return RequestOutput(
        request_id=group.request_id,
        prompt=group.prompt,
        prompt_token_ids=group.prompt_token_ids,
        prompt_logprobs=list(first.prompt_logprobs) if first.wants_prompt_logprobs else None,
        outputs=outputs,
        finished=group.finished,
        queue_seconds=None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time,
    )
