"""Black-box tests of `lmk serve`: a real server process, the official `openai` client and httpx."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from server_process import Server, start_server

from lmkernel import LLM, SamplingParams
from lmkernel.bench.serve import engine_counters

pytestmark = pytest.mark.slow  # a real server: `make test` runs it, `make test-fast` does not

KEY = "sk-test-key"
MODEL = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def adapter(smollm, tmp_path_factory: pytest.TempPathFactory):
    """A random LoRA adapter the server serves as MODEL:tuned."""
    from lora_checks import random_llama_adapter

    return random_llama_adapter(tmp_path_factory.mktemp("lora") / "tuned", smollm.config, seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter):
    s = start_server(tmp_path_factory.mktemp("serve"), MODEL, "--embedding-model", EMBED, "--api-key", KEY,
                     "--kv-cache-memory", "256MiB", "--max-body-bytes", "65536", "--lora", f"tuned={adapter}")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The model as the server loads it (the GGUF in its own blocks), in this process."""
    return LLM(MODEL, kv_cache_memory="64MiB", verbose=False)


def post(server: Server, path: str, body: object, key: str | None = KEY, timeout: float = 120) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=timeout)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


# -- endpoints ------------------------------------------------------------------------------------


def test_models_health_ready(server: Server, client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list()}
    assert sorted(cards) == sorted([MODEL, f"{MODEL}:tuned", EMBED])
    assert cards[f"{MODEL}:tuned"].model_extra["parent"] == MODEL
    assert cards[EMBED].model_extra == {"prompts": [], "dimensions": 384, "matryoshka": False}  # MiniLM's card
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_completion_equals_the_engine_and_streams_the_same(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "The capital of France is"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].text == expected.text
    assert full.choices[0].finish_reason == expected.finish_reason
    assert full.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert full.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids) and not chunks[-1].choices


def test_completion_prompt_forms_n_and_seed(client: openai.OpenAI, llm: LLM) -> None:
    ids = llm.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=4, temperature=0, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    first = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=10, temperature=1.0, seed=7, n=3)
    again = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1, "the n samples should differ"


def test_stop_logprobs_and_echo(client: openai.OpenAI, llm: LLM) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
    stop = free.strip().split()[1]  # a piece of text the free run produces
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert free.startswith(cut.choices[0].text)
    out = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("The sky is")
    n_prompt = len(llm.tokenizer.encode("The sky is"))
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    for chosen, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the best


def test_chat_applies_the_template_and_streams(client: openai.OpenAI, llm: LLM) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected.outputs[0].text
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=3))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == expected.outputs[0].finish_reason
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == len(expected.outputs[0].token_ids)
    assert all(len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)


def test_embeddings_equal_llm_embed(client: openai.OpenAI, minilm) -> None:
    texts = ["Profit rose in the quarter.", "Sales fell."]
    expected = LLM(minilm).embed(texts)
    floats = client.embeddings.create(model=EMBED, input=texts)
    torch.testing.assert_close(torch.tensor([d.embedding for d in floats.data]), expected, atol=1e-5, rtol=1e-4)
    b64 = client.embeddings.create(model=EMBED, input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) for d in b64.data]
    torch.testing.assert_close(torch.tensor(np.stack(decoded)), expected, atol=1e-5, rtol=1e-4)
    ids = minilm.tokenizer.encode(texts[1])
    by_ids = client.embeddings.create(model=EMBED, input=[ids])
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), expected[1], atol=1e-5, rtol=1e-4)
    assert floats.usage.prompt_tokens == sum(len(minilm.tokenizer.encode(t)) for t in texts)


# -- LoRA adapters --------------------------------------------------------------------------------


def test_adapter_is_served_as_model_colon_name(client: openai.OpenAI, smollm, adapter) -> None:
    tuned = LLM(MODEL, kv_cache_memory="64MiB", verbose=False, lora={"tuned": adapter})  # as the server: GGUF blocks
    listed = {m.id: m for m in client.models.list()}
    assert listed[f"{MODEL}:tuned"].model_extra["parent"] == MODEL
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = tuned.generate(prompt, dataclasses.replace(params, lora="tuned"))[0].outputs[0].text
    assert expected != tuned.generate(prompt, params)[0].outputs[0].text  # the adapter matters
    got = client.completions.create(model=f"{MODEL}:tuned", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected and got.model == f"{MODEL}:tuned"
    messages = [{"role": "user", "content": "Name a colour."}]
    chat_expected = tuned.chat(messages, SamplingParams(temperature=0, max_tokens=6, lora="tuned"))[0].outputs[0].text
    chat = client.chat.completions.create(model=f"{MODEL}:tuned", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == chat_expected


def test_unknown_adapter_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model=f"{MODEL}:nope", prompt="Hi", max_tokens=2)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{MODEL}:nope", messages=[{"role": "user", "content": "Hi"}])


def test_bad_lora_option_is_one_clear_line() -> None:
    from test_cli import invoke

    out = invoke("serve", MODEL, "--lora", "tuned")
    assert out.returncode == 1 and "--lora 'tuned': expected NAME=PATH" in out.stderr and "Traceback" not in out.stderr
    out = invoke("serve", MODEL, "--allow-runtime-lora")
    assert out.returncode == 1 and "needs --api-key" in out.stderr and "Traceback" not in out.stderr
    out = invoke("serve", MODEL, "--allow-runtime-lora", "--api-key", "k")
    assert out.returncode == 1 and "needs --lora-modules-dir" in out.stderr and "Traceback" not in out.stderr


def test_runtime_lora_endpoints_are_off_unless_allowed(server: Server, adapter) -> None:
    r = post(server, "/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter)})
    assert assert_error(r, 404)["code"] == "not_enabled"
    assert_error(post(server, "/unload_lora_adapter", {"lora_name": "tuned"}), 404)


# -- errors ---------------------------------------------------------------------------------------


def test_malformed_json(server: Server) -> None:
    assert_error(post(server, "/completions", "{not json"), 400)


def test_wrong_type(server: Server) -> None:
    assert_error(post(server, "/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400, "max_tokens")


def test_value_out_of_range(server: Server) -> None:
    assert_error(post(server, "/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "temperature": 150}), 400, "temperature")
    assert_error(post(server, "/completions", {"model": MODEL, "prompt": "x", "top_p": 0}), 400, "top_p")


def test_prompt_beyond_the_context_names_both_numbers(server: Server, smollm) -> None:
    prompt = "hello " * 50
    err = assert_error(post(server, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 9000}), 400, "prompt")
    n = len(smollm.tokenizer.encode(prompt))
    assert f"{n} tokens" in err["message"] and "9000" in err["message"] and err["code"] == "context_length_exceeded"


def test_empty_messages(server: Server) -> None:
    assert_error(post(server, "/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")


def test_unknown_role(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}
    assert_error(post(server, "/chat/completions", body), 400, "messages[1].role")


def test_tools_on_a_template_without_tools_is_a_400(server: Server) -> None:
    """SmolLM2's template renders no tools: a request offering some is refused, never answered as free text."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    err = assert_error(post(server, "/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "tools": tools}), 400, "tools")
    assert "template" in err["message"]


def test_tokenizer_endpoints_in_vllm_shapes(server: Server, llm: LLM) -> None:
    """/tokenize, /detokenize and /tokenizer_info at the root, as lm-evaluation-harness's remote tokenizer reads them."""
    text = "Hello world, tokens!"

    def root(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    r = root("/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == llm.tokenizer.encode(text, add_special_tokens=False)
    assert body["count"] == len(body["tokens"]) and len(body["token_strs"]) == body["count"] and body["max_model_len"] > 0
    chat = root("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": text}]}).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    assert root("/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}
    assert_error(root("/detokenize", {"tokens": [10**9]}), 400, "tokens")
    assert_error(root("/tokenize", {"prompt": "x", "messages": []}), 400, "prompt")
    info = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == llm.tokenizer.special_tokens["eos_token"] and info["chat_template"] == llm.tokenizer.chat_template
    assert httpx.get(f"{server.url}/tokenizer_info").status_code == 401


@pytest.mark.parametrize(("field", "value"), [("logit_bias", {"42": 5}), ("best_of", 3), ("suffix", "end"),
                                            ("functions", [{"name": "f"}])])
def test_fields_asking_for_what_is_not_served_are_refused(server: Server, field: str, value: object) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, field: value}
    assert_error(post(server, "/completions", body), 400, field)
    assert post(server, "/completions", {**body, field: None, "user": "u-1", "metadata": {"a": 1}}).status_code == 200


def test_missing_and_wrong_key(server: Server) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(post(server, "/completions", body, key=None), 401)
    assert_error(post(server, "/completions", body, key="sk-wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()


def test_unknown_model(server: Server) -> None:
    assert_error(post(server, "/completions", {"model": "gpt-5", "prompt": "x"}), 404, "model")


def test_body_too_large(server: Server) -> None:
    assert_error(post(server, "/completions", {"model": MODEL, "prompt": "x" * 70000}), 413)


def test_embedding_dimensions_refused(server: Server) -> None:
    assert_error(post(server, "/embeddings", {"model": EMBED, "input": "x", "dimensions": 16}), 400, "dimensions")


def test_bad_input_never_stops_the_engine(server: Server, client: openai.OpenAI, llm: LLM) -> None:
    for body, param in (({"model": MODEL, "prompt": [49999999]}, "prompt"), ({"model": MODEL, "prompt": []}, "prompt"),
                        ({"model": MODEL}, "prompt"), ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
                        ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop")):
        assert_error(post(server, "/completions", body), 400, param)
    # The engine answers the next request as an engine that never saw the bad ones does.
    text = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0).choices[0].text
    assert text == llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text and text


# -- load and disconnects -------------------------------------------------------------------------


async def _stream_one(client: httpx.AsyncClient, i: int, drop_after: int | None) -> tuple[int, list[dict], bool]:
    # A dropped stream asks for far more tokens than the test waits for: only an abort ends it in time.
    body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 16 if drop_after is None else 3000,
            "stream": True, "temperature": 0.8, "seed": i, "ignore_eos": True}
    events: list[dict] = []
    done = False
    async with client.stream("POST", "/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
            if drop_after is not None and len(events) >= drop_after:
                break  # leaves the block: the connection closes mid-stream
    return status, events, done


def test_fifty_streams_a_fifth_disconnecting(server: Server) -> None:
    async def run() -> list[tuple[int, list[dict], bool]]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300, limits=limits) as c:
            return await asyncio.gather(*(_stream_one(c, i, 3 if i % 5 == 0 else None) for i in range(50)))

    results = asyncio.run(run())
    assert all(status == 200 for status, _, _ in results)
    for i, (_, events, done) in enumerate(results):
        if i % 5 == 0:
            continue
        assert done, f"stream {i} did not end with [DONE]"
        assert all("error" not in e for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    wait_idle(server)  # the dropped streams are aborted at the next engine step
    assert server.metric("lmkernel_num_requests_waiting") == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert 'status="5' not in text
    assert "lmkernel_time_to_first_token_seconds_count" in text and "lmkernel_inter_token_latency_seconds_count" in text
    # The engine's step counters (what `lmk bench serve` splits a run's time by): 50 prompts went through
    # prefill steps, and the tokens after each first one through decode steps.
    counters = engine_counters(server)
    assert counters["lmkernel_engine_steps:prefill"] >= 1 and counters["lmkernel_engine_steps:decode"] >= 1
    assert counters["lmkernel_engine_tokens:prompt"] >= 50 and counters["lmkernel_engine_tokens:decode"] >= 40
    assert counters["lmkernel_engine_step_seconds:forward_decode"] > 0
    assert counters["lmkernel_engine_step_seconds:forward_prefill"] > 0


def wait_idle(server: Server, seconds: float = 10.0) -> None:
    total = server.metric("lmkernel_kv_cache_total_blocks")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.metric("lmkernel_num_requests_running") == 0 and server.metric("lmkernel_kv_cache_free_blocks") == total:
            return
        time.sleep(0.1)
    raise AssertionError("requests still running or blocks still held")


def test_non_streaming_client_that_leaves_is_aborted(server: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 3000, "ignore_eos": True},
             timeout=1.0)
    wait_idle(server)


def test_one_json_log_line_per_request_without_the_key(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Log me", max_tokens=2, user="someone")
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("endpoint") == "completions" and r.get("prompt_tokens") == 2]
    assert mine and mine[-1]["completion_tokens"] == 2 and mine[-1]["status"] == 200
    assert KEY not in server.log.read_text() and "Log me" not in server.log.read_text()
    assert all(k in mine[-1] for k in ("id", "key", "model", "ttft_s", "e2e_s", "queue_s"))


def test_keys_and_prompts_leak_into_no_title_metric_or_health(server: Server, client: openai.OpenAI) -> None:
    marker = "zebra-kumquat-4711"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say {marker}"}], max_tokens=4)
    cmdline = open(f"/proc/{server.process.pid}/cmdline", "rb").read().decode()
    assert KEY not in cmdline and "--api-key" in cmdline and "***" in cmdline
    for path in ("/metrics", "/health", "/ready"):
        r = httpx.get(f"{server.url}{path}", timeout=30)
        assert r.status_code == 200 and marker not in r.text and KEY not in r.text, path
    assert KEY not in server.log.read_text() and marker not in server.log.read_text()


def test_secret_flags_are_masked() -> None:
    from lmkernel.serve.auth import masked_argv

    assert masked_argv(["lmk", "serve", "m", "--api-key", "sk-1", "--api-key=sk-2", "--port", "80"]) == [
        "lmk", "serve", "m", "--api-key", "***", "--api-key=***", "--port", "80"]
