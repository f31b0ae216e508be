"""What the engine core's tokens become for a caller, outside the core's step (vLLM v1's output processor):
text by incremental detokenization, stop strings (a request the text ends is handed back to the core to
release), log-probs gathered, and the `RequestOutput` of each step, whose text holds back what may still
turn into a stop string. `AsyncEngine` runs it on its event loop while the next step has not started.

The core ends a sequence where its tokens say (end-of-sequence and stop tokens, max_tokens, the context, a
finished grammar); a stop string is the one end only the text shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkernel.engine.request import CompletionOutput, CoreOutput, PositionLogprobs, RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loader.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Sample:
    """One of a request's n samples: the tokens, log-probs and text it produced so far, and how it ended."""

    index: int
    request_id: str  # its sequence in the engine core
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token or string that ended it


@dataclass
class Group:
    """A caller's request: its prompt, its n samples, and what is reported for the prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Sample] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    queue_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    """The caller-side state of every request the engine holds: `add` one, `process` each step's core
    outputs, `abort` one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, Group] = {}
        self.samples: dict[str, tuple[Group, Sample]] = {}  # by the core's sequence id

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            sequence_ids: list[str]) -> None:
        """A request whose n samples run as the core's sequences `sequence_ids`."""
        group = Group(request_id, prompt, prompt_ids, params,
                      prompt_logprobs=[None] if params.prompt_logprobs is not None else [])
        for j, sequence_id in enumerate(sequence_ids):
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            sample = Sample(j, sequence_id, detokenizer)
            group.samples.append(sample)
            self.samples[sequence_id] = (group, sample)
        self.groups[request_id] = group

    def request_ids(self) -> list[str]:
        return list(self.groups)

    def process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The outputs of the requests that advanced, and the core's sequences a stop string ended (for the core
        to release)."""
        touched: dict[str, Group] = {}
        stopped: list[str] = []
        for core in core_outputs:
            if core.request_id not in self.samples:
                continue  # aborted while its step ran
            group, sample = self.samples[core.request_id]
            if sample.index == 0:
                group.prompt_logprobs.extend(core.new_prompt_logprobs)
                if group.queue_seconds is None:
                    group.queue_seconds = core.queue_seconds
            if not core.new_token_ids and core.finish_reason is None:
                continue
            if _advance(sample, core, group.params):
                stopped.append(core.request_id)
            touched[group.request_id] = group
            if sample.finish_reason is not None:
                del self.samples[core.request_id]
        outputs = [group_output(g) for g in touched.values()]
        for group in touched.values():
            if group.finished:
                self.groups.pop(group.request_id, None)
        return outputs, stopped

    def abort(self, request_id: str) -> tuple[RequestOutput, list[str]] | None:
        """End a request's unfinished samples ("abort"): its last output, and the core's sequences to release;
        None if it is unknown or already done."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        running = []
        for sample in group.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
                running.append(sample.request_id)
                self.samples.pop(sample.request_id, None)
        return group_output(group), running


def _advance(sample: Sample, core: CoreOutput, params: SamplingParams) -> bool:
    """Add the step's tokens to the sample, up to a stop string if one appears (then True: the core's sequence
    still runs and must be released); the core's own end applies otherwise."""
    for j, token in enumerate(core.new_token_ids):
        sample.token_ids.append(token)
        if core.new_logprobs is not None:
            sample.logprobs.append(core.new_logprobs[j])
        sample.text += sample.detokenizer.add(token)
        if params.stop and len(sample.token_ids) >= params.min_tokens and _stop_string(sample, params.stop):
            return True
    if core.finish_reason is not None:
        sample.finish_reason, sample.stop_reason = core.finish_reason, core.stop_reason
        sample.text += sample.detokenizer.flush()
    return False


def _stop_string(sample: Sample, stops: list[str]) -> bool:
    """End the sample at the first stop string in its text's tail (the text cut before it)."""
    window = max(map(len, stops)) + 8
    tail_from = max(0, len(sample.text) - window)
    hits = [(sample.text.find(s, tail_from), s) for s in stops]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return False
    at, stop = min(hits)
    sample.text, sample.finish_reason, sample.stop_reason = sample.text[:at], "stop", stop
    return True


def group_output(group: Group) -> RequestOutput:
    """The group's output now: each sample's text and tokens, and what is new since the last one."""
    outputs = []
    hold = max(map(len, group.params.stop), default=1) - 1  # text that may still turn into a stop string
    for s in group.samples:
        visible = len(s.text) if s.finish_reason else max(s.emitted_chars, len(s.text) - hold)
        outputs.append(
            CompletionOutput(
                index=s.index,
                text=s.text[:visible],
                token_ids=list(s.token_ids),
                logprobs=list(s.logprobs) if group.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                delta_text=s.text[s.emitted_chars : visible],
                delta_token_ids=list(s.token_ids[s.emitted_tokens :]),
            )
        )
        s.emitted_chars, s.emitted_tokens = visible, len(s.token_ids)
    return RequestOutput(
        request_id=group.request_id,
        prompt=group.prompt,
        prompt_token_ids=group.prompt_token_ids,
        prompt_logprobs=list(group.prompt_logprobs) if group.params.prompt_logprobs is not None else None,
        outputs=outputs,
        finished=group.finished,
        queue_seconds=group.queue_seconds,
    )
