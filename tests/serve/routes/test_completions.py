"""POST /v1/completions through the app in-process: the engine's greedy text, choices indexed prompt by prompt
then sample by sample, usage counted with the tokenizer, echo, log-prob shapes and the streamed chunks."""

from __future__ import annotations

import itertools

import pytest

from lmkernel import SamplingParams

MODEL = "m"
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def client(app_client):
    with app_client() as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})


def greedy(reference, prompt, max_tokens: int):
    return reference.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0].outputs[0]


def test_a_completion_is_the_engines_greedy_text_with_usage(client, reference, smollm):
    expected = greedy(reference, PROMPT, 4)
    body = complete(client, prompt=PROMPT, max_tokens=4, ignore_eos=True).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": expected.text, "logprobs": None, "finish_reason": "length"}]
    n_prompt = len(smollm.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 4, "total_tokens": n_prompt + 4}


def test_choices_are_indexed_prompt_by_prompt_then_sample_by_sample(client, reference, smollm):
    prompts = ["One", "Two, three"]
    body = complete(client, prompt=prompts, n=2, max_tokens=2, ignore_eos=True).json()
    texts = [greedy(reference, p, 2).text for p in prompts]
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, texts[0]), (1, texts[0]), (2, texts[1]),
                                                                  (3, texts[1])]
    n_prompt = sum(len(smollm.tokenizer.encode(p)) for p in prompts)  # each prompt once, whatever n is
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 8, "total_tokens": n_prompt + 8}


def test_echo_of_a_token_id_prompt_is_its_decoded_text(client, reference, smollm):
    ids = smollm.tokenizer.encode("Hello world")
    choice = complete(client, prompt=ids, echo=True, max_tokens=2, ignore_eos=True).json()["choices"][0]
    assert choice["text"] == "Hello world" + greedy(reference, "Hello world", 2).text


def test_echoed_logprobs_cover_the_prompt_then_the_completion(client, smollm):
    n_prompt = len(smollm.tokenizer.encode(PROMPT))
    choice = complete(client, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, ignore_eos=True).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and "".join(lp["tokens"]) == choice["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 3
    assert lp["text_offset"] == list(itertools.accumulate((len(t) for t in lp["tokens"][:-1]), initial=0))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 2 and chosen <= max(top.values()) + 1e-6
    for token, chosen, top in zip(lp["tokens"][n_prompt:], lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:]):
        assert top[token] == chosen == max(top.values())  # greedy: the chosen token is the most likely one


def test_logprobs_zero_lists_the_chosen_tokens_only(client):
    choice = complete(client, prompt=PROMPT, logprobs=0, max_tokens=3, ignore_eos=True).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 3
    assert lp["top_logprobs"] == [{}, {}, {}] and all(v < 0 for v in lp["token_logprobs"])
    assert lp["text_offset"] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]


def test_a_stream_of_two_prompts_and_two_samples(client, sse_events, reference, smollm):
    prompts = ["One", "Two, three"]
    events = sse_events(complete(client, prompt=prompts, n=2, max_tokens=3, ignore_eos=True, stream=True,
                                 stream_options={"include_usage": True}))
    *chunks, usage = events
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("cmpl-")
    assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in chunks)
    texts = [greedy(reference, p, 3).text for p in prompts]
    for index in range(4):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == texts[index // 2]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
    n_prompt = sum(len(smollm.tokenizer.encode(p)) for p in prompts)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12,
                                                         "total_tokens": n_prompt + 12}


def test_a_streamed_echo_opens_with_the_prompt_and_has_no_usage_unasked(client, sse_events, reference):
    events = sse_events(complete(client, prompt=PROMPT, echo=True, max_tokens=2, ignore_eos=True, stream=True))
    assert events[0]["choices"][0]["text"].startswith(PROMPT)
    assert "".join(e["choices"][0]["text"] for e in events) == PROMPT + greedy(reference, PROMPT, 2).text
    assert all("usage" not in e and len(e["choices"]) == 1 for e in events)


@pytest.mark.parametrize("prompt", [[[]], ["a", ""], [[1, 2], []]])
def test_a_prompt_without_tokens_is_refused(client, api_error, prompt):
    assert api_error(complete(client, prompt=prompt), 400, "prompt") == "every prompt needs at least one token"
