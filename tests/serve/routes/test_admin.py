"""The server about itself, through the app in-process: /health, /ready until the server drains, /metrics
counting answers by endpoint and status, and /v1/models' cards (an embedding model's with its prompts)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

MODEL = "m"
KEY = "sk-admin"
DRAINING = {"error": {"message": "the server is shutting down", "type": "service_unavailable", "param": None,
                      "code": "draining"}}


@pytest.fixture(scope="module")
def client(app_client):
    with app_client() as c:
        yield c


def test_ready_names_the_served_models_until_the_server_drains(app_client):
    with app_client() as c:
        assert c.get("/ready").json() == {"status": "ready", "models": [MODEL]}
        c.app.state.server.draining = True
        for r in (c.get("/ready"), c.get("/v1/models")):  # the guard refuses every /v1/ call too
            assert r.status_code == 503 and r.json() == DRAINING
        assert c.get("/health").json() == {"status": "ok"}  # alive, though no longer ready


def test_metrics_count_answers_by_endpoint_and_status(client):
    for _ in range(2):
        assert client.get("/v1/models").status_code == 200
    assert client.post("/v1/completions", json={"model": MODEL}).status_code == 400
    assert client.get("/nowhere").status_code == 404
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    for sample in ('lmkernel_requests_total{endpoint="/v1/models",status="200"} 2.0',
                   'lmkernel_requests_total{endpoint="/v1/completions",status="400"} 1.0',
                   'lmkernel_requests_total{endpoint="other",status="404"} 1.0', "lmkernel_ready 1.0"):
        assert sample in lines, sample


def test_models_lists_a_card_for_each_served_model(app_client, api_error):
    embedder = SimpleNamespace(prompts={"query": "query: ", "document": "passage: "}, dimensions=384, matryoshka=True)
    before = int(time.time())
    with app_client(embedder=embedder, embedding_model_name="e", api_keys=[KEY]) as c:
        api_error(c.get("/v1/models"), 401, code="invalid_api_key")
        body = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    created = body["data"][0]["created"]
    assert before <= created <= int(time.time())
    assert body == {"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": created, "owned_by": "lmkernel"},
        {"id": "e", "object": "model", "created": created, "owned_by": "lmkernel", "prompts": ["document", "query"],
         "dimensions": 384, "matryoshka": True}]}


def test_a_server_without_models_lists_none(app_client):
    with app_client(generation=False) as c:
        assert c.get("/v1/models").json() == {"object": "list", "data": []}
        assert c.get("/ready").json() == {"status": "ready", "models": []}
