"""The support-desk example end to end against `lmk serve` with Qwen2.5-Coder-1.5B and MiniLM: an answer from
the right FAQ passage, an order question answered through the tool, an off-topic question declined, and the
customer's email kept out of the server's log."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from lmkernel.bench.serve import start_server_process

pytestmark = pytest.mark.slow  # a 1.5B model behind a server: `make test` runs it, `make test-fast` does not

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_desk" / "desk.py"
MODEL, ENCODER = "qwen2.5-coder-1.5b-instruct", "all-minilm-l6-v2"


def load_desk_module():
    spec = importlib.util.spec_from_file_location("support_desk", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["support_desk"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("desk")
    log = d / "server.log"
    server = start_server_process([MODEL, "--embedding-model", ENCODER, "--log-prompts", "--kv-cache-memory", "256MiB"], log)
    module = load_desk_module()
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused", timeout=600)
        yield module, module.SupportDesk(client, MODEL, ENCODER, db_path=d / "orders.db"), log
    finally:
        server.stop()


def test_a_policy_question_is_answered_from_the_right_passage(desk) -> None:
    module, support, _ = desk
    answer = support.answer("How many days do I have to send back a kettle I don't like?")
    assert answer.sources[0] == "returns.md#Return window" and not answer.declined and not answer.tool_calls
    assert "30" in answer.text, answer.text


def test_an_order_question_calls_the_tool(desk) -> None:
    module, support, log = desk
    answer = support.answer("Hi, this is jane.doe@example.com. Has my order A1002 shipped yet?")
    assert [c["name"] for c in answer.tool_calls] == ["lookup_order"], answer
    assert answer.tool_calls[0]["arguments"]["order_id"] == "A1002" and answer.tool_calls[0]["result"]["status"] == "shipped"
    assert "shipped" in answer.text.lower() or "00340434161094042557" in answer.text, answer.text
    text = log.read_text()
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text  # the server's log is redacted


def test_an_off_topic_question_is_declined(desk) -> None:
    module, support, _ = desk
    answer = support.answer("What is the capital of Australia?")
    assert answer.declined and answer.text == module.DECLINE and not answer.tool_calls
