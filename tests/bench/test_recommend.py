"""`lmk bench recommend`'s fairness: both sides read one file and one split, and the scoring equals RecBole's own."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lmkernel.apps.recommend_data import movielens_100k, read_interactions, read_items, user_sequences
from lmkernel.bench import recommend as rb


@pytest.fixture(scope="module")
def movielens():
    inter, item = movielens_100k()
    items = read_items(item)
    return read_interactions(inter, items), items


def test_score_counts_hits_ranks_and_only_the_chosen_users() -> None:
    targets = {"u1": "a", "u2": "b", "u3": "c"}
    top = {"u1": ["a", "x"], "u2": ["x", "x2", "b"], "u3": ["x"]}
    m = rb.score(top, targets)
    assert m["users"] == 3 and m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3) and m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    only = rb.score(top, targets, {"u2"})
    assert only["users"] == 1 and only["mrr@10"] == pytest.approx(1 / 3)


def test_cold_items_keep_only_test_interactions_and_the_file_orders_by_time(movielens, tmp_path: Path) -> None:
    data, items = movielens
    prepared = rb.prepare(data, items, tmp_path, "cold", 0.1, seed=0)
    assert len(prepared.cold_items) == 168 and len(prepared.targets) == 943
    assert prepared.cold_users and all(prepared.targets[u] in prepared.cold_items for u in prepared.cold_users)
    last = {int(seq[-1]) for seq in user_sequences(prepared.data)}
    for r, i in enumerate(prepared.data.item):
        if items.ids[i] in prepared.cold_items:
            assert r in last  # a cold item's only interactions are some users' test items
    lines = (tmp_path / "cold" / "cold.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    ranks = np.array([int(line.split("\t")[3]) for line in lines[1:]])
    assert sorted(ranks) == list(range(len(prepared.data)))  # ranks, exact in float32
    order = np.argsort(ranks, kind="stable")
    assert (np.diff(prepared.data.time[order]) >= 0).all()


@pytest.mark.slow
def test_recbole_splits_the_same_way_and_scores_as_we_do(movielens, tmp_path: Path) -> None:
    """RecBole's Pop on the written file: its test users, its own NDCG@10 and ours on its top 10s agree, which
    holds only if its last-by-time items are ours."""
    data, items = movielens
    prepared = rb.prepare(data, items, tmp_path, "ml", 0.0, seed=0)
    result = rb.run_peer("Pop", prepared, timeout=600)
    assert set(result["top10"]) == set(prepared.targets) and all(len(t) == 10 for t in result["top10"].values())
    ours = rb.score(result["top10"], prepared.targets)
    assert ours["ndcg@10"] == pytest.approx(result["test"]["ndcg@10"], abs=1e-4)
    assert ours["hr@10"] == pytest.approx(result["test"]["hit@10"], abs=1e-4)
    assert ours["ndcg@10"] > 0.03  # popularity is a real baseline here, not an empty list
