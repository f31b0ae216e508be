"""The API as /openapi.json describes it, fuzzed by schemathesis against a real `lmk serve`: every operation
with a body, generated from the declared schemas (valid and invalid), never answers a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from server_process import Server, start_server

pytestmark = pytest.mark.slow  # a real server, fuzzed: `make test` runs it, `make test-fast` does not

KEY = "sk-fuzz"
GENERATE, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
# Valid requests name a served model (any other name is a 404 before the body is looked at further).
SERVED = {"/v1/completions": GENERATE, "/v1/chat/completions": GENERATE, "/v1/embeddings": EMBED, "/tokenize": GENERATE,
          "/detokenize": GENERATE}


def _served_model(case):
    if isinstance(case.body, dict) and case.path in SERVED and "model" in case.body:
        case.body["model"] = SERVED[case.path]
    return case


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("serve"), GENERATE, "--embedding-model", EMBED,
                     "--api-key", KEY, "--kv-cache-memory", "128MiB", "--request-timeout", "3", "--allow-runtime-lora",
                     "--max-loras", "1", "--lora-modules-dir", str(tmp_path_factory.mktemp("adapters")))
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def api_schema(server: Server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_body_is_declared(api_schema) -> None:
    posts = {path: ops["post"] for path, ops in api_schema.raw_schema["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize",
                          "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/recommend"}
    for path, op in posts.items():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in api_schema.raw_schema["components"]["schemas"], path
        assert "200" in op["responses"] and "400" in op["responses"], path


def _fuzz(operation, mode: schemathesis.GenerationMode, server: Server) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    @given(case=strategy.map(_served_model) if mode == schemathesis.GenerationMode.POSITIVE else strategy)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def run(case) -> None:
        case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                               checks=[not_a_server_error], timeout=60)

    run()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_input_is_a_server_error(api_schema, server: Server, mode) -> None:
    """Each operation with 25 generated requests, valid (positive; every operation) or not (negative; those
    with a body), seeded."""
    failed = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a request without parameters or a body
        try:
            _fuzz(operation, mode, server)
        except Exception as exc:  # noqa: BLE001 - every operation is tried; all failures are reported together
            failed.append(f"{operation.label}: {exc}")
    assert not failed, "\n\n".join(failed)
