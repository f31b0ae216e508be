"""The support desk's retrieval on each embedding model lmkernel pulls, through `/v1/embeddings` in-process: the
model's "document" / "query" prompts where `/v1/models` lists them, the right passage first, and off-topic
questions under the model's own line. None of these questions chose a line (the desk's were set on others)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from test_support_desk import load_desk_module

from lmkernel import load_model
from lmkernel.engine.async_embedder import AsyncEmbedder
from lmkernel.registry import ALIASES, alias_location
from lmkernel.serve.app import ServerConfig, build_app

pytestmark = pytest.mark.slow  # four embedding models: `make test` runs it, `make test-fast` does not

ON_TOPIC = [("How many days do I have to send back a kettle I don't like?", "returns.md"),
            ("My toaster broke after three months, will you repair it for free?", "warranty.md"),
            ("Can I update the delivery address on my account?", "account.md"),
            ("How long does shipping usually take?", "shipping.md"),
            ("Which credit cards do you accept?", "payment.md")]
OFF_TOPIC = ["What is the capital of Australia?", "What's the weather like in Paris today?",
             "Who painted the Mona Lisa?", "Explain quantum entanglement in simple terms."]


@pytest.mark.parametrize("alias", ["all-minilm-l6-v2", "all-mpnet-base-v2", "nomic-embed-text-v1.5", "embeddinggemma-300m"])
def test_the_desk_retrieves_and_declines_with_each_embedding_model(alias, tmp_path) -> None:
    module = load_desk_module()
    loaded = load_model(alias_location(ALIASES[alias]))
    app = build_app(ServerConfig(model_name=None, embedding_model_name=alias), None, AsyncEmbedder(loaded))
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        desk = module.SupportDesk(client, "none", alias, db_path=tmp_path / "orders.db")
        assert desk.min_similarity == module.MIN_SIMILARITY[alias]
        assert desk.query_prompt == ("query" if "query" in loaded.config.prompts else None)
        for question, page in ON_TOPIC:
            hits = desk.retrieve(question)
            assert hits[0][1].startswith(page + "#") and not desk.off_topic(question, hits), (question, hits)
        for question in OFF_TOPIC:
            hits = desk.retrieve(question)
            assert desk.off_topic(question, hits), (question, hits[0])
        assert not desk.off_topic("Where is my order B2001?", desk.retrieve("Where is my order B2001?"))
