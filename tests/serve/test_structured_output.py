"""Structured output through a real `lmk serve` of Qwen2.5-Coder-0.5B-Instruct and the official `openai`
client: `response_format` (json_schema, json_object), vLLM's `structured_outputs`, and their errors (tools:
test_tool_calls.py)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from server_process import Server

pytestmark = pytest.mark.slow  # a real server: `make test` runs it, `make test-fast` does not

MODEL = "qwen2.5-coder-0.5b-instruct"
TOPICS = ["a cat", "a bicycle", "Paris", "a laptop", "the Moon", "a violin", "an oak tree", "a river", "a castle",
          "a robot", "coffee", "a lighthouse", "a volcano", "a library", "a train", "a penguin", "chess", "a bridge",
          "a tomato", "a satellite"]
THING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["animal", "object", "place", "plant", "food", "other"]},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 3},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["name", "category", "facts", "rating"],
    "additionalProperties": False,
}




def ask(client: openai.OpenAI, topic: str, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Describe {topic} as a JSON object."}], max_tokens=200,
        **{"temperature": 0.7, "seed": len(topic), **kwargs})


def test_json_schema_strict_validates_for_20_prompts(qwen_client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": THING, "strict": True}}
    with ThreadPoolExecutor(8) as pool:  # concurrent: constrained requests batched together
        answers = list(pool.map(lambda t: ask(qwen_client, t, response_format=fmt), TOPICS))
    for topic, answer in zip(TOPICS, answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (topic, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), THING)


def test_json_object_streamed_parses(qwen_client: openai.OpenAI) -> None:
    # Greedy, and a prompt that asks for a small object: json_object bounds the shape, not the length, and a sampled
    # answer may nest until max_tokens (seen on one CPU path).
    stream = ask(qwen_client, "a teapot (its name and colour only)", response_format={"type": "json_object"},
                 stream=True, temperature=0)
    chunks = [chunk for chunk in stream if chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_vllm_structured_outputs_in_completions_and_chat(qwen_client: openai.OpenAI) -> None:
    done = qwen_client.completions.create(model=MODEL, prompt="Today's date in ISO format:", max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", done.choices[0].text)
    chat = qwen_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is 'the results beat forecasts' good or bad news?"}],
        max_tokens=5, temperature=0, extra_body={"structured_outputs": {"choice": ["good", "bad"]}})
    assert chat.choices[0].message.content in ("good", "bad")


def post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
])
def test_what_cannot_be_enforced_is_a_400_naming_the_field(qwen_server: Server, extra: dict, param: str) -> None:
    r = post(qwen_server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
