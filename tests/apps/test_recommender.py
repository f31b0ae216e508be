"""`lmk recommend` end to end on a slice of MovieLens-100k: fit, eval, query, cold items, and /v1/recommend."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
from pathlib import Path

import httpx
import pytest
from test_cli import invoke

from lmkernel.apps.recommend_data import movielens_100k, read_interactions, read_items
from lmkernel.apps.recommend_store import Recommender

pytestmark = pytest.mark.slow  # fits an encoder and a ranker: `make test` runs it, `make test-fast` does not

NEW_ITEM = ("new-1", "Return of the Jedi: Special Edition", "Action Adventure Romance Sci-Fi War", "1983")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """300 users of MovieLens-100k as CSV, the catalogue plus one new item with no interactions, fitted briefly."""
    d = tmp_path_factory.mktemp("recommend")
    inter_path, item_path = movielens_100k()
    items = read_items(item_path)
    data = read_interactions(inter_path, items)
    with (d / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "genres", "year"])
        for i, item in enumerate(items.ids):
            w.writerow([item, items.titles[i], " ".join(sorted(items.genres[i])),
                        "" if items.years[i] != items.years[i] else int(items.years[i])])
        w.writerow(NEW_ITEM)
    keep = [u for u in range(len(data.users)) if int(data.users[u]) <= 300]
    with (d / "inter.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "rating", "time"])
        for u, i, r, t in zip(data.user, data.item, data.rating, data.time):
            if u in keep:
                w.writerow([data.users[u], items.ids[i], f"{r:g}", f"{t:.0f}"])
    out = invoke("recommend", "fit", "--interactions", str(d / "inter.csv"), "--items", str(d / "items.csv"), "-o",
                 str(d / "rec"), "--encoder-steps", "30", "--encoder-batch-size", "32")
    assert out.returncode == 0, out.stderr
    return d, d / "rec", d / "inter.csv"


def test_fit_writes_a_directory_whose_metrics_eval_reproduces(fitted) -> None:
    _, rec, _ = fitted
    meta = json.loads((rec / "recommender.json").read_text())
    assert meta["users"] == 300 and meta["items"] == 1683 and meta["test"]["users"] == 300
    assert 0 < meta["test"]["ndcg@10"] <= meta["test"]["hr@10"] <= 1
    out = invoke("recommend", "eval", str(rec))
    assert out.returncode == 0, out.stderr
    assert f"{meta['test']['ndcg@10']:.4f}" in out.stdout and f"{meta['valid']['hr@10']:.4f}" in out.stdout
    # The fine-tuned encoder is a model directory lmkernel (and sentence-transformers) loads.
    assert (rec / "encoder" / "config.json").is_file() and (rec / "encoder" / "modules.json").is_file()


def test_query_never_recommends_what_the_user_has_seen(fitted) -> None:
    _, rec, inter = fitted
    seen: dict[str, set[str]] = {}
    with inter.open() as f:
        for row in csv.DictReader(f):
            seen.setdefault(row["user"], set()).add(row["item"])
    model = Recommender.load(rec)
    for user in ("1", "42", "196", "300"):
        top = model.query(user, k=50)
        assert len(top) == 50 and len({r["item"] for r in top}) == 50
        assert not {r["item"] for r in top} & seen[user], user
        assert [r["rank"] for r in top] == list(range(1, 51))
    out = invoke("recommend", "query", str(rec), "--user", "196", "-k", "5", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert [r["item"] for r in answer["items"]] == [r["item"] for r in model.query("196", k=5)]


def test_a_new_item_with_text_only_can_be_recommended(fitted) -> None:
    """No one has interacted with it; users with a Star Wars film among their last five get it through its text."""
    _, rec, inter = fitted
    model = Recommender.load(rec)
    star_wars = {model.item_index[i] for i in ("50", "172", "181")}  # Star Wars, Empire Strikes Back, Return of the Jedi
    recent_fans = [u for u, rows in zip(model.data.users, model.histories)
                   if star_wars & set(model.data.item[rows[-5:]].tolist())]
    tops = [[r["item"] for r in model.query(u, k=10)] for u in recent_fans]
    hits = sum(NEW_ITEM[0] in top for top in tops)
    assert len(recent_fans) >= 5 and hits >= len(recent_fans) // 2, (hits, len(recent_fans))
    # Without the new-item place the ranker, which judges by behaviour, never shows it.
    model.engine.config = model.config = dataclasses.replace(model.config, new_item_slots=0)
    assert not any(NEW_ITEM[0] in [r["item"] for r in model.query(u, k=10)] for u in recent_fans)


def test_served_at_v1_recommend(fitted) -> None:
    from lmkernel.serve.app import ServerConfig, build_app

    _, rec, _ = fitted
    model = Recommender.load(rec)
    app = build_app(ServerConfig(model_name=None), None, None, model)

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await client.post("/v1/recommend", json=body) for body in
                    ({"user": "196", "k": 3}, {"user": "no-such-user"}, {"user": "196", "k": 0}, {"k": 3})]

    ok, unknown, bad_k, missing = asyncio.run(calls())
    assert ok.status_code == 200, ok.text
    assert ok.json()["object"] == "recommendation" and [r["item"] for r in ok.json()["items"]] == \
        [r["item"] for r in model.query("196", k=3)]
    assert unknown.status_code == 404 and "no-such-user" in unknown.json()["error"]["message"]
    assert bad_k.status_code == 400 and bad_k.json()["error"]["param"] == "k"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "user"


def test_bad_inputs_are_refused_clearly(fitted, tmp_path: Path) -> None:
    d, rec, _ = fitted
    out = invoke("recommend", "fit", "--interactions", str(tmp_path / "none.csv"), "--items", str(d / "items.csv"),
                 "-o", str(tmp_path / "r"))
    assert out.returncode == 1 and "--items" not in out.stderr and "none.csv: no such file" in out.stderr
    out = invoke("recommend", "fit", "--interactions", str(d / "inter.csv"), "--items", str(d / "items.csv"), "-o", str(rec))
    assert out.returncode == 1 and "already exists" in out.stderr
    out = invoke("recommend", "query", str(rec), "--user", "nobody")
    assert out.returncode == 1 and "user 'nobody' has no interactions" in out.stderr
    out = invoke("recommend", "eval", str(tmp_path))
    assert out.returncode == 1 and "not a recommender directory" in out.stderr
