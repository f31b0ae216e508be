"""The server process under limits and shutdown: rate limits, a full queue, timeouts, SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from server_process import Server, start_server

pytestmark = pytest.mark.slow  # real servers: `make test` runs it, `make test-fast` does not

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# one key per line\nsk-rate\nsk-queue\n\nsk-time\n")
    s = start_server(tmp_path_factory.mktemp("serve"), MODEL, "--api-keys-file", str(keys), "--kv-cache-memory",
                     "128MiB", "--rate-limit-rpm", "3", "--max-queued-requests", "1", "--request-timeout", "1.5",
                     "--log-prompts")
    yield s
    assert s.stop() == 0, s.log.read_text()


def post(server: Server, key: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base_url}/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=timeout)


def test_rate_limit_per_key_with_retry_after(limited: Server) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    assert [post(limited, "sk-rate", body).status_code for _ in range(3)] == [200, 200, 200]
    r = post(limited, "sk-rate", body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["Retry-After"]) >= 1


def test_queue_full_is_429(limited: Server) -> None:
    long = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "ignore_eos": True}
    holder = threading.Thread(target=post, args=(limited, "sk-queue", long))
    holder.start()
    time.sleep(0.5)  # the first request now holds the only place
    r = post(limited, "sk-queue", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    holder.join()
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and "Retry-After" in r.headers


def test_request_timeout_aborts_and_frees_blocks(limited: Server) -> None:
    r = post(limited, "sk-time", {"model": MODEL, "prompt": "Once", "max_tokens": 2000, "ignore_eos": True})
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    time.sleep(0.5)
    assert limited.metric("lmkernel_num_requests_running") == 0
    assert limited.metric("lmkernel_kv_cache_free_blocks") == limited.metric("lmkernel_kv_cache_total_blocks")


def test_logged_prompts_are_redacted(limited: Server) -> None:
    r = post(limited, "sk-time", {"model": MODEL, "prompt": "Write to jane.doe@example.com or call +44 20 7946 0958",
                                  "max_tokens": 3, "stream": True})
    assert r.status_code == 200
    time.sleep(0.3)
    log = limited.log.read_text()
    assert "jane.doe@example.com" not in log and "7946 0958" not in log and "sk-time" not in log
    record = [json.loads(line) for line in log.splitlines() if line.startswith("{") and "[EMAIL]" in line][-1]
    assert record["prompt"] == "Write to [EMAIL] or call [PHONE]" and record["output"] and record["status"] == 200


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(tmp_path) -> None:
    s = start_server(tmp_path, MODEL, "--kv-cache-memory", "128MiB", "--shutdown-grace", "60")
    lines: list[str] = []

    def stream() -> None:
        # Long enough to be in flight when SIGTERM comes a second in (SmolLM2 decodes ~200 tokens/s here).
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.base_url}/completions", json=body, timeout=120) as r:
            lines.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
    ready = httpx.get(f"{s.url}/ready", timeout=10)
    t.join(120)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert ready.status_code == 503
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finals[-1] == "length" and len(finals) == 1000
    assert s.process.wait(60) == 0
