"""Reading interactions and items (CSV, JSON lines, RecBole atomic files) and the leave-one-out split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmkernel.apps.recommend_data import leave_one_out, movielens_100k, read_interactions, read_items, user_sequences
from lmkernel.train.data import DataError


def test_movielens_from_the_recbole_package_reads_whole() -> None:
    inter, item = movielens_100k()
    items = read_items(item)
    data = read_interactions(inter, items)
    assert len(items.ids) == 1682 and len(data) == 100_000 and len(data.users) == 943
    toy = items.ids.index("1")
    assert items.text(toy) == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert np.isnan(items.years).sum() >= 1  # "unkonwn" years are unknown, not an error


def test_leave_one_out_takes_each_users_last_two_by_time(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item,title,genres,year\na,Alpha,Drama,1990\nb,Beta,Comedy|Drama,\nc,Gamma,,2001\nd,Delta,,\n")
    inter = tmp_path / "inter.jsonl"
    rows = [("u1", "a", 5), ("u1", "b", 1), ("u1", "c", 3), ("u1", "d", 3), ("u2", "a", 2), ("u2", "b", 9), ("u3", "c", 1)]
    inter.write_text("".join(json.dumps({"user": u, "item": i, "time": t, "rating": 4}) + "\n" for u, i, t in rows))
    catalogue = read_items(items)
    data = read_interactions(inter, catalogue)
    assert catalogue.genres[1] == {"Comedy", "Drama"} and np.isnan(catalogue.years[1])
    split = leave_one_out(data)
    item = lambda rows_: sorted(catalogue.ids[data.item[r]] for r in rows_)  # noqa: E731
    # u1 in time order: b(1), c(3), d(3, after c in the file), a(5): test a, valid d; u2 and u3 are too short.
    assert item(split.test) == ["a"] and item(split.valid) == ["d"]
    assert sorted(data.users[data.user[r]] + catalogue.ids[data.item[r]] for r in split.train) == ["u1b", "u1c", "u2a", "u2b", "u3c"]
    assert [len(s) for s in user_sequences(data)] == [4, 2, 1]


def test_bad_files_name_the_file_line_and_field(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item,title\na,Alpha\n")
    catalogue = read_items(items)
    cases = [("user,item,time\nu1,z,1\n", "line 2: item 'z' is not in the items file"),
             ("user,item\nu1,a\n", "line 2: missing the 'time' field"),
             ("user,item,time\nu1,a,soon\n", "line 2: 'time' must be a number"),
             ("user,item,time,rating\nu1,a,1,nan\n", "'rating' must be finite")]
    for text, message in cases:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            read_interactions(bad, catalogue)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"item": "a", "text": "x"}\n{"item": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="line 2: item 'a' is listed twice"):
        read_items(twice)
    (tmp_path / "items.txt").write_text("x")
    with pytest.raises(DataError, match="expected a .csv, .jsonl, or RecBole"):
        read_items(tmp_path / "items.txt")
    with pytest.raises(DataError, match="no such file"):
        read_items(tmp_path / "missing.csv")
