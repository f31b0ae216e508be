"""A fitted recommender directory (lmkernel/apps/recommend_store.py): what `Recommender.load` refuses, each
with the file it found wanting (no fitting here)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lmkernel.apps.recommend_store import CONFIG_FILE, FORMAT, Recommender
from lmkernel.apps.recommender import RecommenderConfig, to_json
from lmkernel.errors import LmkError


def refused(path, message: str) -> None:
    with pytest.raises(LmkError, match=f"^{re.escape(message)}$"):
        Recommender.load(path)


def test_a_directory_without_the_config_file_is_not_a_recommender(tmp_path) -> None:
    refused(tmp_path, f"{tmp_path}: not a recommender directory (no {CONFIG_FILE}; make one with `lmk recommend fit`)")


def test_the_config_file_must_be_json_of_this_format(tmp_path) -> None:
    config = tmp_path / CONFIG_FILE
    config.write_text("{not json")
    refused(tmp_path, f"{config}: not JSON (Expecting property name enclosed in double quotes)")
    config.write_text(json.dumps({"format": FORMAT + 1}))
    refused(tmp_path, f"{config}: format {FORMAT + 1}; this lmkernel reads format {FORMAT}")
    config.write_text("{}")
    refused(tmp_path, f"{config}: format None; this lmkernel reads format {FORMAT}")


def test_missing_parts_are_named(tmp_path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT}))
    (tmp_path / "vectors.npy").write_bytes(b"")
    refused(tmp_path, f"{tmp_path}: incomplete recommender directory, missing items.jsonl, interactions.npz, "
                      "ranker.txt, encoder")


def test_vectors_must_have_a_row_per_item(tmp_path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "config": to_json(RecommenderConfig())}))
    (tmp_path / "items.jsonl").write_text(
        "".join(json.dumps({"item": i, "title": i.upper(), "genres": [], "year": None}) + "\n" for i in ("a", "b")))
    np.savez(tmp_path / "interactions.npz", user=np.array([0]), item=np.array([1]), rating=np.array([1.0]),
             time=np.array([0.0]), users=np.array(["u"]))
    np.save(tmp_path / "vectors.npy", np.zeros((3, 4), dtype=np.float32))
    (tmp_path / "ranker.txt").write_text("")
    (tmp_path / "encoder").mkdir()
    refused(tmp_path, f"{tmp_path}: vectors.npy has 3 rows for 2 items")
