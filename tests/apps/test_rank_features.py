"""The re-ranker's features (lmkernel/apps/rank_features.py) on a three-item, two-user history, each column
worked out by hand: nothing at or after `now` is counted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmkernel.apps.rank_features import DAY, FEATURES, Moment, PopularityClock, features, user_vector
from lmkernel.apps.recommend_data import Interactions, ItemTable

# (user, item, rating, day): user 0 saw items 0, 1 then 2; user 1 saw items 0 and 2
ROWS = [(0, 0, 4.0, 0), (0, 1, 2.0, 10), (1, 0, 5.0, 20), (1, 2, 3.0, 40), (0, 2, 1.0, 45)]
DATA = Interactions(["u0", "u1"], np.array([r[0] for r in ROWS]), np.array([r[1] for r in ROWS]),
                    np.array([r[2] for r in ROWS], dtype=np.float32), np.array([r[3] * DAY for r in ROWS]))
ITEMS = ItemTable(["i0", "i1", "i2"], ["A", "B", "C"], [frozenset({"a", "b"}), frozenset({"b"}), frozenset({"c"})],
                  np.array([2000.0, math.nan, 1990.0]))


def clock() -> PopularityClock:
    return PopularityClock(DATA, np.array([4, 2, 0, 3, 1]), 3)  # rows in any order: the clock sorts them by time


def test_counts_take_interactions_from_since_up_to_before() -> None:
    c = clock()
    assert c.first_seen.tolist() == [0.0, 10 * DAY, 40 * DAY]
    assert c.counts(45 * DAY).tolist() == [2, 1, 1]  # the one at day 45 is not before day 45
    assert c.counts(45 * DAY, since=20 * DAY).tolist() == [1, 0, 1]
    assert c.counts(46 * DAY, since=45 * DAY).tolist() == [0, 0, 1]
    assert c.counts(0.0).tolist() == [0, 0, 0]


def test_a_clock_over_some_rows_counts_only_those() -> None:
    c = PopularityClock(DATA, np.array([0, 3]), 3)
    assert c.counts(100 * DAY).tolist() == [1, 0, 1]
    assert c.first_seen.tolist() == [0.0, math.inf, 40 * DAY]


def test_mean_rating_falls_back_to_the_overall_mean_for_unrated_items() -> None:
    c = clock()
    assert c.mean_rating(30 * DAY).tolist() == pytest.approx([4.5, 2.0, 11 / 3])
    assert c.mean_rating(0.0).tolist() == [0.0, 0.0, 0.0]


def test_user_vector_weights_recent_items_more_and_is_normalised() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    # weights 0.5 (older) and 1 (latest): (0.5, 1) / sqrt(1.25)
    assert user_vector(vectors, np.array([0, 1]), 2, 0.5).tolist() == pytest.approx([0.5 / 1.25 ** 0.5, 1 / 1.25 ** 0.5])
    assert user_vector(vectors, np.array([0, 1]), 1, 0.5).tolist() == [0.0, 1.0]  # only the last item
    assert user_vector(vectors, np.array([2]), 5, 0.9).tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])


def test_feature_columns_by_hand() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    moment = Moment(np.array([0, 1]), np.array([0.0, 10 * DAY]), now=30 * DAY)  # user 0 at day 30
    out = features(moment, np.array([2, 0]), ann_rank=np.array([1, 2]), from_popular=np.array([0, 1]),
                   user_vec=np.array([0.0, 1.0], dtype=np.float32), vectors=vectors, clock=clock(), items=ITEMS)
    assert out.shape == (2, len(FEATURES)) and out.dtype == np.float32
    now_year = 1970 + 30 / 365.25
    expected = {
        "sim_user": [0.8, 0.0], "sim_last": [0.8, 0.0], "sim_max5": [0.8, 1.0], "ann_rank": [1, 2],
        "pop_all": [0.0, math.log(3)], "pop_30d": [0.0, math.log(3)], "pop_7d": [0.0, 0.0],  # before day 30: 2 of item 0
        "item_age_days": [-1.0, 30.0],  # item 2 is first seen at day 40, after now
        "release_gap_years": [now_year - 1990, now_year - 2000],
        "genre_overlap": [0.0, 3 / 10 ** 0.5],  # liked a:1, b:2 (norm sqrt 5); item 0 has a and b (sqrt 2)
        "mean_rating": [11 / 3, 4.5], "user_activity": [math.log(3)] * 2, "days_since_last": [20.0, 20.0],
        "from_popular": [0.0, 1.0],
    }
    assert list(expected) == list(FEATURES)
    for i, name in enumerate(FEATURES):
        assert out[:, i].tolist() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_an_unknown_release_year_is_minus_one() -> None:
    vectors = np.eye(3, dtype=np.float32)
    moment = Moment(np.array([0]), np.array([0.0]), now=DAY)
    out = features(moment, np.array([1]), np.array([1]), np.array([0]), vectors[0], vectors, clock(), ITEMS)
    assert out[0, FEATURES.index("release_gap_years")] == -1.0
    assert out[0, FEATURES.index("genre_overlap")] == pytest.approx(0.5 ** 0.5)  # liked a, b (norm sqrt 2); item 1: b
