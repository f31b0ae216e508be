"""Running a request's prompts on the engine: the server-sent event frames, the top log-probs of a position,
the usage of every prompt and sample, and --request-timeout (a 408 answered, or ending a stream, with the
engine left idle and the request logged with its status)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from lmkernel.engine.request import CheckedPrompt, Logprob
from lmkernel.engine.sampling import SamplingParams
from lmkernel.serve.generation import Generation, sse, top

MODEL = "m"
LATE = {"error": {"message": "the request ran past --request-timeout (0.5 s) and was aborted", "type": "timeout_error",
                  "param": None, "code": "timeout"}}
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def test_sse_frames_json_unescaped_and_text_as_is():
    assert sse({"text": "café", "n": 1}) == 'data: {"text": "café", "n": 1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_top_takes_the_n_best_ranks_in_order():
    position = {5: Logprob(-0.1, 1, "a"), 7: Logprob(-2.0, 3), 9: Logprob(-1.0, 2, "b"), 11: Logprob(-6.0, 40, "z")}
    assert top(position, 2) == [(5, -0.1, "a"), (9, -1.0, "b")]
    assert top(position, 3) == [(5, -0.1, "a"), (9, -1.0, "b"), (7, -2.0, "")]  # no decoded text: ""
    assert top(position, 0) == []
    assert top(position, 20) == top(position, 3)  # a sampled token ranked 40th is not among the top 20


def test_usage_counts_every_prompt_once_and_every_sample():
    prompts = [CheckedPrompt((1, 2, 3), SamplingParams(n=2)), CheckedPrompt((4, 5), SamplingParams(n=2))]
    gen = Generation(SimpleNamespace(), "completions", None, prompts, ["x", None])
    sample = lambda k: SimpleNamespace(token_ids=list(range(k)))  # noqa: E731
    gen.final = [SimpleNamespace(outputs=[sample(4), sample(1)]), None]  # the second prompt has not finished
    assert gen.usage() == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    gen.final[1] = SimpleNamespace(outputs=[sample(2), sample(0)])
    assert gen.usage() == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


@pytest.fixture(scope="module")
def late(app_client):
    """A server whose requests may run half a second, with room for far longer ones (1000 tokens take seconds)."""
    with app_client(max_model_len=2048, kv_cache_memory="64MiB", request_timeout=0.5) as c:
        yield c


def wait_idle(client, seconds: float = 10.0) -> dict:
    engine = client.app.state.service.engine
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the timed-out request still holds the engine: {engine.stats()}")


def logged(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmkernel.requests"]


def test_a_request_past_the_timeout_is_a_408_and_is_aborted(late, caplog):
    caplog.set_level("INFO", logger="lmkernel.requests")
    r = late.post("/v1/completions", json=LONG)
    assert r.status_code == 408 and r.json() == LATE
    state = late.app.state.server
    assert (state.generating, state.in_flight) == (0, 0)
    wait_idle(late)
    assert [(x["endpoint"], x["status"]) for x in logged(caplog)] == [("completions", 408)]


def test_a_stream_past_the_timeout_ends_with_the_error_then_done(late, sse_events, caplog):
    caplog.set_level("INFO", logger="lmkernel.requests")
    events = sse_events(late.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1000,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == LATE and all("usage" not in e for e in events)  # cut short: no usage chunk
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    wait_idle(late)
    assert [(x["endpoint"], x["status"]) for x in logged(caplog)] == [("chat", 408)]


def test_a_finished_request_is_logged_with_its_usage(app_client, caplog, smollm):
    caplog.set_level("INFO", logger="lmkernel.requests")
    with app_client() as c:
        body = c.post("/v1/completions", json={**LONG, "max_tokens": 2}).json()
    [record] = logged(caplog)
    n_prompt = len(smollm.tokenizer.encode(LONG["prompt"]))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2, "total_tokens": n_prompt + 2}
    assert (record["id"], record["endpoint"], record["model"], record["status"]) == (
        body["id"].removeprefix("cmpl-"), "completions", MODEL, 200)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (n_prompt, 2)
    assert "prompt" not in record and "output" not in record  # not without --log-prompts
