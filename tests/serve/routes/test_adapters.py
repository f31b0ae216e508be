"""LoRA adapters loaded and unloaded at run time, through the app in-process: the exact answers, the card
the loaded adapter gets in /v1/models, the names refused, and where a lora_path may point."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.serve.protocol import APIError
from lmkernel.serve.routes.adapters import allowed_adapter_path

MODEL = "m"
KEY = "sk-lora"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(smollm, tmp_path_factory) -> Path:
    """The one directory adapters may be loaded from, holding adapter `a`."""
    from lora_checks import random_llama_adapter

    directory = tmp_path_factory.mktemp("adapters")
    random_llama_adapter(directory / "a", smollm.config, seed=1)
    return directory


@pytest.fixture(scope="module")
def client(app_client, root):
    with app_client(api_keys=[KEY], allow_runtime_lora=True, lora_modules_dirs=[str(root)], max_loras=2) as c:
        yield c


def post(client, path: str, body: dict):
    return client.post(path, json=body, headers=AUTH)


def model_ids(client) -> list[str]:
    return [card["id"] for card in client.get("/v1/models", headers=AUTH).json()["data"]]


def test_load_serve_and_unload(client):
    r = post(client, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"})
    assert r.json() == {"lora_name": "a", "status": "loaded", "model": f"{MODEL}:a", "unloaded": None}
    cards = {c["id"]: c for c in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert cards[f"{MODEL}:a"]["parent"] == MODEL and "parent" not in cards[MODEL]
    done = post(client, "/v1/completions", {"model": f"{MODEL}:a", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    assert done.json()["model"] == f"{MODEL}:a" and done.json()["usage"]["completion_tokens"] == 2
    assert post(client, "/v1/unload_lora_adapter", {"lora_name": "a"}).json() == {"lora_name": "a", "status": "unloaded"}
    assert model_ids(client) == [MODEL]


def test_a_loaded_name_is_not_loaded_twice(client, root, api_error):
    assert post(client, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(root / "a")}).status_code == 200
    again = post(client, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "a"})
    assert api_error(again, 400, "lora_name") == "an adapter named 'b' is already loaded; unload it first"
    assert post(client, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200
    message = api_error(post(client, "/v1/unload_lora_adapter", {"lora_name": "b"}), 404, "lora_name")
    assert message == "LoRA adapter 'b' is not loaded"


@pytest.mark.parametrize("name", ["", " a", "a ", "x:y"])
def test_names_that_cannot_follow_model_colon_are_refused(client, api_error, name):
    message = api_error(post(client, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "a"}), 400, "lora_name")
    assert message.startswith(f"lora_name {name!r}: expected a non-empty name")


def test_a_server_without_a_generation_model_loads_nothing(app_client, api_error, root):
    with app_client(generation=False, api_keys=[KEY], allow_runtime_lora=True, lora_modules_dirs=[str(root)]) as c:
        r = post(c, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"})
        assert "--allow-runtime-lora" in api_error(r, 404, code="not_enabled")


def test_a_relative_path_is_taken_inside_the_first_directory(root, tmp_path):
    assert allowed_adapter_path("a", [str(root), str(tmp_path)]) == str((root / "a").resolve())
    assert allowed_adapter_path(str(tmp_path / "x"), [str(root), str(tmp_path)]) == str((tmp_path / "x").resolve())


@pytest.mark.parametrize("path", ["../elsewhere", "/", "a/../../a"])
def test_a_path_out_of_the_directories_is_forbidden(root, path):
    with pytest.raises(APIError) as refused:
        allowed_adapter_path(path, [str(root)])
    assert (refused.value.status, refused.value.param, refused.value.code) == (403, "lora_path", "forbidden_path")


def test_a_path_with_a_nul_byte_is_unusable(root):
    with pytest.raises(APIError) as refused:
        allowed_adapter_path("a\0b", [str(root)])
    err = refused.value
    assert (err.status, err.param, err.message) == (400, "lora_path", "lora_path is not a usable file system path")
