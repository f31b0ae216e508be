"""The output processor, outside the engine core's step: the core's tokens as text, stop strings (text the caller
never sees, and sequences handed back to be released), the core's own ends, held-back text and aborts."""

from __future__ import annotations

import pytest

from lmkernel.engine.output_processor import OutputProcessor
from lmkernel.engine.request import CoreOutput, Logprob
from lmkernel.engine.sampling import SamplingParams


@pytest.fixture
def tok(smollm):
    return smollm.tokenizer


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def test_text_is_the_detokenized_tokens_and_a_core_end_finishes_it(tok):
    p = OutputProcessor(tok)
    prompt = _ids(tok, "Hello")
    p.add("r", "Hello", prompt, SamplingParams(max_tokens=8), ["r"])
    words = _ids(tok, " there, my friend")
    [first], stopped = p.process([CoreOutput("r", words[:2], queue_seconds=0.25)])
    assert not stopped and not first.finished and first.queue_seconds == 0.25
    assert first.outputs[0].text == tok.decode(words[:2]) and first.outputs[0].delta_token_ids == words[:2]
    [last], _ = p.process([CoreOutput("r", words[2:], finish_reason="length")])
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert last.outputs[0].text == tok.decode(words) and last.outputs[0].token_ids == words
    assert last.outputs[0].delta_text == tok.decode(words)[len(first.outputs[0].text):]
    assert p.request_ids() == []  # finished requests are forgotten


def test_a_stop_string_cuts_the_text_drops_later_tokens_and_hands_the_sequence_back(tok):
    p = OutputProcessor(tok)
    p.add("r", None, [1, 2], SamplingParams(max_tokens=50, stop=["friend"]), ["r"])
    words = _ids(tok, " hello my friend and more words")
    [out], stopped = p.process([CoreOutput("r", words)])  # several tokens at once, as checked proposals give
    assert stopped == ["r"]
    o = out.outputs[0]
    assert o.text == " hello my " and o.finish_reason == "stop" and o.stop_reason == "friend"
    kept = next(i for i in range(1, len(words) + 1) if "friend" in tok.decode(words[:i]))
    assert o.token_ids == words[:kept]  # nothing after the token that completed the stop string
    assert out.finished and p.request_ids() == []


def test_text_that_may_become_a_stop_string_is_held_back(tok):
    p = OutputProcessor(tok)
    p.add("r", None, [1], SamplingParams(max_tokens=50, stop=["STOP!"]), ["r"])
    words = _ids(tok, " one two three four")
    [out], _ = p.process([CoreOutput("r", words)])
    full = tok.decode(words)
    assert out.outputs[0].text == full[: len(full) - 4]  # the last len("STOP!") - 1 characters wait
    [out], _ = p.process([CoreOutput("r", [], finish_reason="length")])
    assert out.outputs[0].text == full and out.outputs[0].delta_text == full[-4:]


def test_min_tokens_keeps_a_stop_string_from_ending_it_early(tok):
    p = OutputProcessor(tok)
    p.add("r", None, [1], SamplingParams(max_tokens=50, stop=["a"], min_tokens=40), ["r"])
    [out], stopped = p.process([CoreOutput("r", _ids(tok, " a a a"))])
    assert not stopped and out.outputs[0].finish_reason is None


def test_samples_logprobs_prompt_logprobs_and_abort(tok):
    p = OutputProcessor(tok)
    params = SamplingParams(max_tokens=5, n=2, logprobs=1, prompt_logprobs=1)
    p.add("g", None, [5, 6, 7], params, ["g#0", "g#1"])
    lp = {9: Logprob(-0.5, 1, "x")}
    outs, _ = p.process([CoreOutput("g#0", [9], [lp], new_prompt_logprobs=[lp, lp]),
                         CoreOutput("g#1", [10], [lp])])
    [out] = outs  # one output for the request, both samples in it
    assert out.prompt_logprobs == [None, lp, lp]
    assert [o.token_ids for o in out.outputs] == [[9], [10]] and out.outputs[0].logprobs == [lp]
    [out], _ = p.process([CoreOutput("g#0", [11], [lp], finish_reason="stop", stop_reason=11)])
    assert out.outputs[0].stop_reason == 11 and not out.finished
    aborted, running = p.abort("g")
    assert running == ["g#1"] and aborted.finished and aborted.outputs[1].finish_reason == "abort"
    assert p.abort("g") is None
    assert p.process([CoreOutput("g#1", [12])]) == ([], [])  # a step that ran while it was aborted
