"""LoRA adapters loaded and unloaded while `lmk serve --allow-runtime-lora` runs (vLLM's endpoints): used at
once with the in-process engine's outputs, loaded while requests run, unloaded only after the requests on
them finish, the least recently used one dropped for room, and bad adapters refused naming the file."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import openai
import pytest
from lora_checks import random_llama_adapter
from server_process import Server, start_server

from lmkernel import LLM, SamplingParams

pytestmark = pytest.mark.slow  # a real server: `make test` runs it, `make test-fast` does not

KEY = "sk-lora"
MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the city begins"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    """The one directory the server may load adapters from."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def adapter_dirs(smollm, root) -> dict[str, str]:
    return {name: str(random_llama_adapter(root / name, smollm.config, seed=i + 1)) for i, name in enumerate("abc")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, root):
    s = start_server(tmp_path_factory.mktemp("serve"), MODEL, "--api-key", KEY, "--allow-runtime-lora", "--max-loras", "2",
                     "--kv-cache-memory", "128MiB", "--lora-modules-dir", str(root))
    yield s
    assert s.stop() == 0, s.log.read_text()


def call(server: Server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}/{path}", json=body, headers=headers, timeout=120)


def complete(server: Server, model: str, max_tokens: int = 12) -> httpx.Response:
    return call(server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                                        "ignore_eos": True})


def test_load_use_unload_and_load_again(server: Server, smollm, adapter_dirs) -> None:
    assert call(server, "load_lora_adapter", {"lora_name": "a", "lora_path": adapter_dirs["a"]}).status_code == 200
    models = [m.id for m in openai.OpenAI(base_url=server.base_url, api_key=KEY).models.list()]
    assert f"{MODEL}:a" in models
    expected = LLM(smollm, lora={"a": adapter_dirs["a"]}, kv_cache_memory="64MiB", verbose=False).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora="a"))[0].outputs[0].text
    got = complete(server, f"{MODEL}:a").json()["choices"][0]["text"]
    base = complete(server, MODEL).json()["choices"][0]["text"]
    assert got == expected and got != base
    assert call(server, "unload_lora_adapter", {"lora_name": "a"}).json()["status"] == "unloaded"
    assert complete(server, f"{MODEL}:a").status_code == 404
    assert call(server, "unload_lora_adapter", {"lora_name": "a"}).status_code == 404
    # the same name, other weights: nothing of the old load (its cached prefixes included) is used
    assert call(server, "load_lora_adapter", {"lora_name": "a", "lora_path": adapter_dirs["b"]}).status_code == 200
    assert complete(server, f"{MODEL}:a").json()["choices"][0]["text"] != got
    assert call(server, "unload_lora_adapter", {"lora_name": "a"}).status_code == 200


def test_unload_waits_for_running_requests_and_loading_does_not_stop_them(server: Server, adapter_dirs) -> None:
    assert call(server, "load_lora_adapter", {"lora_name": "b", "lora_path": adapter_dirs["b"]}).status_code == 200
    done: dict[str, float] = {}

    def long_request(model: str, key: str) -> None:
        r = complete(server, model, max_tokens=300)
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0
        done[key] = time.monotonic()

    runs = [threading.Thread(target=long_request, args=(f"{MODEL}:b", "on_b")),
            threading.Thread(target=long_request, args=(MODEL, "on_base"))]
    for t in runs:
        t.start()
    time.sleep(0.5)
    assert call(server, "load_lora_adapter", {"lora_name": "c", "lora_path": adapter_dirs["c"]}).status_code == 200
    assert complete(server, f"{MODEL}:b").status_code == 200  # b still serves until asked to go
    asked = time.monotonic()
    r = call(server, "unload_lora_adapter", {"lora_name": "b"})
    unloaded = time.monotonic()
    for t in runs:
        t.join()
    # The unload answered only once the request on b had finished (its 300 tokens take seconds; the two
    # answers reach their threads within a scheduling slice of each other).
    assert r.status_code == 200 and unloaded - asked > 0.5 and done["on_b"] <= unloaded + 0.1
    assert complete(server, f"{MODEL}:c").status_code == 200
    assert call(server, "unload_lora_adapter", {"lora_name": "c"}).status_code == 200


def test_least_recently_used_adapter_makes_room(server: Server, adapter_dirs) -> None:
    for name in ("a", "b"):
        assert call(server, "load_lora_adapter", {"lora_name": name, "lora_path": adapter_dirs[name]}).status_code == 200
    complete(server, f"{MODEL}:a")  # a is now more recently used than b
    r = call(server, "load_lora_adapter", {"lora_name": "c", "lora_path": adapter_dirs["c"]})
    assert r.status_code == 200 and r.json()["unloaded"] == "b"
    models = [m.id for m in openai.OpenAI(base_url=server.base_url, api_key=KEY).models.list()]
    assert f"{MODEL}:a" in models and f"{MODEL}:c" in models and f"{MODEL}:b" not in models
    for name in ("a", "c"):
        assert call(server, "unload_lora_adapter", {"lora_name": name}).status_code == 200


def test_adapters_load_only_from_the_given_directories(server: Server, smollm, root, adapter_dirs, tmp_path) -> None:
    """Outside --lora-modules-dir (directly, by '..', or through a symlink inside it, to the directory or to one of
    its files) is a 403 that does not say whether the path exists; a relative path is taken inside the directory."""
    outside = random_llama_adapter(tmp_path / "outside", smollm.config, seed=4)
    (root / "link").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    for f in outside.iterdir():
        (sneaky / f.name).symlink_to(f)
    for path in (str(outside), str(tmp_path / "missing"), f"{root}/../{tmp_path.name}/outside", str(root / "link"),
                 str(sneaky), "/etc"):
        r = call(server, "load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path", path
        assert r.json()["error"]["code"] == "forbidden_path"
    r = call(server, "load_lora_adapter", {"lora_name": "rel", "lora_path": "a"})
    assert r.status_code == 200, r.text
    assert call(server, "unload_lora_adapter", {"lora_name": "rel"}).status_code == 200


def test_bad_adapters_and_keys(server: Server, smollm, root, adapter_dirs) -> None:
    assert call(server, "load_lora_adapter", {"lora_name": "x", "lora_path": adapter_dirs["a"]}, key=None).status_code == 401
    r = call(server, "load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "missing")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path" and "missing" in r.json()["error"]["message"]
    other = random_llama_adapter(root / "wide", dataclasses.replace(smollm.config, hidden_size=640), seed=9)
    r = call(server, "load_lora_adapter", {"lora_name": "wide", "lora_path": str(other)})
    assert r.status_code == 400 and str(other) in r.json()["error"]["message"]
    assert call(server, "load_lora_adapter", {"lora_name": "bad:name", "lora_path": adapter_dirs["a"]}).json()["error"]["param"] == "lora_name"
    assert call(server, "unload_lora_adapter", {"lora_name": "never"}).status_code == 404
