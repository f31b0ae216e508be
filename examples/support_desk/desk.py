"""A customer-support assistant on `lmk serve`: answers from a small Markdown knowledge base, looks up orders
through a tool, and declines what is not about the shop.

    lmk serve qwen2.5-coder-1.5b-instruct --embedding-model nomic-embed-text-v1.5 --log-prompts
    python examples/support_desk/desk.py "How long do I have to return a kettle?"

Everything goes through the OpenAI API of the server (the official `openai` client): the knowledge base is
cut into passages (one per `##` section) and embedded with `/v1/embeddings` into a FAISS index; a question
is embedded the same way (with the model's "document" and "query" prompts, where `/v1/models` lists them) and
the nearest passages go into the chat request as context; a question that names
an order (a letter and four digits) is sent with the `lookup_order` tool and `tool_choice: "required"`, the
model's call is run against the SQLite database this example creates, and the answer is written from what
it returned; the server redacts personal data (emails, phone numbers) from its logs. A question whose
nearest passage is far from everything in the knowledge base and that names no order is declined without
asking the model.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from openai import OpenAI

HERE = Path(__file__).parent
DECLINE = "Sorry, I can only help with questions about ACME Home orders, shipping, returns, payment and accounts."
ORDER_ID = re.compile(r"\b[A-Z]\d{4}\b")
# A question less similar than this to every passage is off-topic. Cosines run on each model's own scale, so each
# has its own line: midway between the least similar of 8 on-topic questions and the most similar of 8 off-topic
# ones (questions written for this, none of them the tests'). nomic's margin is the narrowest (0.567 to 0.616).
MIN_SIMILARITY = {"all-minilm-l6-v2": 0.24, "all-mpnet-base-v2": 0.27, "nomic-embed-text-v1.5": 0.59,
                  "embeddinggemma-300m": 0.31}
TOOLS = [{
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order by its id (a letter and four digits, e.g. A1002): status, items, dates, tracking.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "description": "e.g. A1002"}},
                       "required": ["order_id"]},
    },
}]
ORDERS = [
    ("A1001", "processing", "Electric kettle", "2026-11-28", None, None),
    ("A1002", "shipped", "Espresso machine", "2026-11-20", "2026-11-21", "DHL 00340434161094042557"),
    ("A1003", "delivered", "Toaster, 2 slots", "2026-11-02", "2026-11-03", "UPS 1Z999AA10123456784"),
    ("A1004", "cancelled", "Hand blender", "2026-10-30", None, None),
]


def create_orders_db(path: Path) -> Path:
    """The example's order database (recreated each time)."""
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT, items TEXT, placed TEXT, shipped TEXT, tracking TEXT)")
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", ORDERS)
    return path


def lookup_order(db_path: Path, order_id: str) -> dict[str, Any]:
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT id, status, items, placed, shipped, tracking FROM orders WHERE id = ?",
                         (order_id.strip().upper(),)).fetchone()
    if row is None:
        return {"error": f"no order {order_id}"}
    return dict(zip(("order_id", "status", "items", "placed", "shipped", "tracking"), row))


def passages(kb_dir: Path) -> list[tuple[str, str]]:
    """(source, text) per `##` section of each Markdown file, the page title kept in front."""
    out = []
    for path in sorted(kb_dir.glob("*.md")):
        title, sections = "", re.split(r"^## ", path.read_text(encoding="utf-8"), flags=re.M)
        title = sections[0].strip().lstrip("# ").strip()
        for section in sections[1:]:
            heading, _, body = section.partition("\n")
            out.append((f"{path.name}#{heading.strip()}", f"{title}: {heading.strip()}. {' '.join(body.split())}"))
    return out


@dataclass
class Answer:
    text: str
    sources: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    declined: bool = False


class SupportDesk:
    def __init__(self, client: OpenAI, model: str, embedding_model: str, kb_dir: Path = HERE / "kb",
                 db_path: Path = HERE / "orders.db", min_similarity: float | None = None) -> None:
        self.client, self.model, self.embedding_model = client, model, embedding_model
        self.min_similarity = min_similarity if min_similarity is not None else MIN_SIMILARITY.get(embedding_model, 0.30)
        card = next((m for m in client.models.list().data if m.id == embedding_model), None)
        prompts = ((card.model_extra or {}).get("prompts") if card is not None else None) or []
        self.query_prompt = "query" if "query" in prompts else None
        self.passages = passages(kb_dir)
        self.db_path = create_orders_db(db_path)
        vectors = self._embed([text for _, text in self.passages], "document" if "document" in prompts else None)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def _embed(self, texts: list[str], prompt_name: str | None) -> np.ndarray:
        extra = {"prompt_name": prompt_name} if prompt_name else None
        data = self.client.embeddings.create(model=self.embedding_model, input=texts, extra_body=extra).data
        vectors = np.array([d.embedding for d in data], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def retrieve(self, question: str, k: int = 3) -> list[tuple[float, str, str]]:
        scores, ids = self.index.search(self._embed([question], self.query_prompt), k)
        return [(float(s), *self.passages[i]) for s, i in zip(scores[0], ids[0])]

    def off_topic(self, question: str, hits: list[tuple[float, str, str]]) -> bool:
        """Far from every passage, and naming no order: declined without asking the model."""
        return hits[0][0] < self.min_similarity and not ORDER_ID.search(question)

    def answer(self, question: str) -> Answer:
        hits = self.retrieve(question)
        if self.off_topic(question, hits):
            return Answer(DECLINE, declined=True)
        context = "\n".join(f"[{source}] {text}" for _, source, text in hits)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": (
                "You are the customer-support assistant of ACME Home, an online shop for kitchen appliances. "
                "Answer in one or two sentences, using only the passages below and, for a specific order, what "
                f"lookup_order returns. If the question is not about the shop, reply exactly: {DECLINE}"
                f"\n\nPassages:\n{context}")},
            {"role": "user", "content": question},
        ]
        result = Answer("", [source for _, source, _ in hits])
        if ORDER_ID.search(question):
            # A question that names an order must go through the tool: the model is required to call it (and
            # picks its argument from the question); the tool is not offered otherwise, since a small model
            # offered tools it does not need tends to talk about them.
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                        max_tokens=80, tools=TOOLS, tool_choice="required")
            found = []
            for call in reply.choices[0].message.tool_calls or []:
                try:
                    args = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    args = {}
                looked_up = lookup_order(self.db_path, str(args.get("order_id", "")))
                result.tool_calls.append({"name": call.function.name, "arguments": args, "result": looked_up})
                found.append(looked_up)
            # The answer is written from the lookup in a request without tools: a 1.5B model shown its own tool
            # call tends to repeat it instead of answering.
            messages[0]["content"] += "\n\nlookup_order returned:\n" + "\n".join(json.dumps(f) for f in found)
        reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0, max_tokens=160)
        result.text = reply.choices[0].message.content or ""
        result.declined = DECLINE in result.text
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="+")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--embedding-model", default="nomic-embed-text-v1.5")
    parser.add_argument("--min-similarity", type=float, help="off-topic below this cosine (default: the model's line)")
    args = parser.parse_args()
    desk = SupportDesk(OpenAI(base_url=args.base_url, api_key="unused"), args.model, args.embedding_model,
                       min_similarity=args.min_similarity)
    for question in args.question:
        answer = desk.answer(question)
        print(json.dumps({"question": question, **answer.__dict__}, indent=2))


if __name__ == "__main__":
    main()
