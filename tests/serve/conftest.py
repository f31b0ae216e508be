"""A real `lmk serve` of Qwen2.5-Coder-0.5B-Instruct (a model that can call tools), started once per test
process for the files that drive it with real clients."""

from __future__ import annotations

import openai
import pytest
from server_process import Server, start_server

QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="session")
def qwen_server(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("serve-qwen"), QWEN, "--kv-cache-memory", "256MiB")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="session")
def qwen_client(qwen_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=qwen_server.base_url, api_key="unused", max_retries=0, timeout=300)
