"""POST /v1/chat/completions through the app in-process: the engine's greedy chat, usage counted over the
chat template's tokens, n choices, max_completion_tokens over max_tokens, log-prob entries and the streamed
chunks (one opening per choice, deltas, a finish, usage, [DONE])."""

from __future__ import annotations

import pytest

from lmkernel import SamplingParams

MODEL = "m"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(app_client):
    with app_client() as c:
        yield c


@pytest.fixture(scope="module")
def prompt_tokens(smollm) -> int:
    return len(smollm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "temperature": 0, **body})


def greedy_text(reference, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return reference.chat(MESSAGES, params)[0].outputs[0].text


def test_an_answer_is_the_engines_greedy_chat_with_usage(client, reference, prompt_tokens):
    body = chat(client, max_tokens=3, ignore_eos=True).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": greedy_text(reference, 3)},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}


def test_n_choices_are_indexed_and_each_counted(client, reference, prompt_tokens):
    body = chat(client, n=3, max_tokens=2, ignore_eos=True).json()
    text = greedy_text(reference, 2)
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, text), (1, text), (2, text)]
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


def test_max_completion_tokens_wins_over_max_tokens(client):
    body = chat(client, max_tokens=6, max_completion_tokens=2, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("top_n", [None, 2])
def test_logprobs_have_one_entry_per_token(client, reference, top_n):
    extra = {} if top_n is None else {"top_logprobs": top_n}
    choice = chat(client, max_tokens=3, ignore_eos=True, logprobs=True, **extra).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == 3 and "".join(e["token"] for e in entries) == choice["message"]["content"]
    assert choice["message"]["content"] == greedy_text(reference, 3)
    for e in entries:
        assert e["bytes"] == list(e["token"].encode()) and e["logprob"] < 0
        if top_n is None:
            assert e["top_logprobs"] == []
        else:  # greedy: the chosen token heads the list
            assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0] == {k: e[k] for k in ("token", "logprob", "bytes")}
            assert e["top_logprobs"][1]["logprob"] <= e["logprob"]


def test_top_logprobs_without_logprobs_is_refused(client, api_error):
    assert api_error(chat(client, top_logprobs=2), 400, "top_logprobs") == "top_logprobs needs logprobs: true"


def test_a_stream_opens_every_choice_then_sends_deltas_a_finish_and_usage(client, sse_events, reference, prompt_tokens):
    events = sse_events(chat(client, n=2, max_tokens=3, ignore_eos=True, stream=True,
                             stream_options={"include_usage": True}))
    *chunks, usage = events
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in events)
    assert [e["choices"] for e in chunks[:2]] == [[{"index": j, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}] for j in (0, 1)]
    text = greedy_text(reference, 3)
    for j in (0, 1):
        mine = [e["choices"][0] for e in chunks[2:] if e["choices"][0]["index"] == j]
        assert "".join(c["delta"]["content"] for c in mine[:-1]) == text
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert mine[-1] == {"index": j, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6,
                                                         "total_tokens": prompt_tokens + 6}


def test_a_stream_without_include_usage_sends_no_usage(client, sse_events):
    events = sse_events(chat(client, max_tokens=2, ignore_eos=True, stream=True))
    assert all("usage" not in e and len(e["choices"]) == 1 for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
