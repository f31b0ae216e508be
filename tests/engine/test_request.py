"""`request.py`: where a sequence's own tokens end it (`token_end`), and what a checked prompt may cost."""

from __future__ import annotations

from lmkernel.engine.request import CheckedPrompt, Request, token_end
from lmkernel.engine.sampling import SamplingParams

EOS = frozenset({2})


def _request(**params) -> Request:
    return Request("r", [5, 6, 7], SamplingParams(**{"max_tokens": 10, **params}), 0)


def test_end_of_sequence_and_stop_tokens_end_it_after_min_tokens():
    assert token_end(_request(), 2, 1, EOS, 100) == ("stop", None)
    assert token_end(_request(stop_token_ids=[9]), 9, 1, EOS, 100) == ("stop", 9)  # the token is the stop reason
    assert token_end(_request(min_tokens=3), 2, 2, EOS, 100) is None  # too early: not yet
    assert token_end(_request(min_tokens=3), 2, 3, EOS, 100) == ("stop", None)
    assert token_end(_request(ignore_eos=True), 2, 1, EOS, 100) is None
    assert token_end(_request(ignore_eos=True, stop_token_ids=[2]), 2, 1, EOS, 100) == ("stop", 2)
    assert token_end(_request(), 4, 1, EOS, 100) is None


def test_max_tokens_and_the_context_end_it_by_length():
    assert token_end(_request(), 4, 9, EOS, 100) is None
    assert token_end(_request(), 4, 10, EOS, 100) == ("length", None)
    assert token_end(_request(), 4, 4, EOS, 7) == ("length", None)  # 3 prompt + 4 output tokens fill a context of 7
    assert token_end(_request(), 4, 3, EOS, 7) is None
    assert token_end(_request(), 2, 10, EOS, 100) == ("stop", None)  # a stop token on the last one says stop


class _Grammar:
    """A stand-in matcher: accepts tokens below 50, is complete after `done` of them."""

    def __init__(self, done: int) -> None:
        self.done, self.fed = done, []

    def consume_token(self, token: int) -> bool:
        self.fed.append(token)
        return token < 50

    def is_stopped(self) -> bool:
        return len(self.fed) >= self.done


def test_a_complete_or_refusing_grammar_ends_it_and_sees_every_token():
    r = _request()
    r.matcher = _Grammar(done=2)
    assert token_end(r, 4, 1, EOS, 100) is None
    assert token_end(r, 4, 2, EOS, 100) == ("stop", None)  # complete
    r.matcher = _Grammar(done=99)
    assert token_end(r, 60, 1, EOS, 100) == ("stop", None)  # a token it refuses
    r.matcher = _Grammar(done=99)
    assert token_end(r, 4, 10, EOS, 100) == ("length", None) and r.matcher.fed == [4]  # fed even when length ends it


def test_a_checked_prompt_costs_its_ids_and_every_samples_max_tokens():
    assert CheckedPrompt((1, 2, 3), SamplingParams(max_tokens=5, n=3)).most_tokens == 3 + 15
