"""A fitted recommender as a directory, and the operations on it: `fit` writes one, `Recommender.load` reads it
for `lmk recommend eval|query` and `POST /v1/recommend`.

The directory: `recommender.json` (settings and the measured metrics), `items.jsonl` (the catalogue),
`interactions.npz` (the behaviour it was fitted on, which is also every user's history at query time),
`encoder/` (the fine-tuned encoder, a Hugging Face directory that `lmk serve --embedding-model` also takes),
`vectors.npy` (item vectors) and `ranker.txt` (the LightGBM model). It is written to a temporary directory
and renamed into place, so a failed fit never leaves half a recommender.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmkernel.apps.rank_features import Moment, PopularityClock
from lmkernel.apps.recommend_data import Interactions, ItemTable, leave_one_out, user_sequences
from lmkernel.apps.item_encoder import fine_tune, item_vectors
from lmkernel.apps.recommender import (Engine, FitResult, RecommenderConfig, build_groups, encoder_pairs, from_json,
                                       metrics, split_rows, to_json, train_ranker)
from lmkernel.errors import LmkError

FORMAT = 1
CONFIG_FILE = "recommender.json"


def fit(data: Interactions, items: ItemTable, out: Path, config: RecommenderConfig, overwrite: bool = False,
        log: Callable[[str], None] = print, device: str = "cpu") -> FitResult:
    """Fine-tune the encoder, index the items, train the ranker, measure valid and test, write `out`."""
    import lightgbm as lgb  # noqa: F401  (fail before the long part if the extra is missing)

    from lmkernel.loader.hf_export import prepare_output, publish, save_model_dir
    from lmkernel.loading import load_model

    config.check()
    prepare_output(out, overwrite)
    seconds: dict[str, float] = {}
    split = leave_one_out(data)
    if len(split.valid) == 0:
        raise LmkError("--interactions: no user has three interactions; the split needs a training, a validation "
                       "and a test item per user")
    by_user, encoder_rows, ranker_rows = split_rows(data, split, config.ranker_targets)
    start = time.monotonic()
    loaded = load_model(config.encoder, device=device, quantization=None)  # training updates float weights
    if not loaded.config.is_encoder:
        raise LmkError(f"--encoder {config.encoder}: not a sentence encoder (e.g. all-minilm-l6-v2)")
    texts = items.texts()
    pairs = encoder_pairs(data, encoder_rows, config.encoder_training.window)
    log(f"encoder: {len(pairs):,} behaviour pairs, {config.encoder_training.steps} steps")
    losses = fine_tune(loaded, texts, pairs, config.encoder_training,
                       on_step=lambda s, loss: s % 100 == 0 and log(f"encoder step {s}: loss {loss:.3f}"))
    vectors = item_vectors(loaded, texts)
    seconds["encoder"] = time.monotonic() - start
    start = time.monotonic()
    engine = Engine(items, vectors, PopularityClock(data, split.train, len(items.ids)), config)
    train_groups = build_groups(engine, data, by_user, ranker_rows)
    valid_groups = build_groups(engine, data, by_user, split.valid.tolist())
    test_groups = build_groups(engine, data, by_user, split.test.tolist())
    engine.ranker = train_ranker(train_groups, valid_groups, config)
    seconds["ranker"] = time.monotonic() - start
    result = FitResult(metrics(engine, valid_groups), metrics(engine, test_groups), losses,
                       int(engine.ranker.best_iteration), seconds)
    log(f"valid: {_line(result.valid)}; test: {_line(result.test)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model_dir(loaded.model, loaded.config, loaded.tokenizer, loaded.dtype, tmp / "encoder")
        np.save(tmp / "vectors.npy", vectors)
        engine.ranker.save_model(str(tmp / "ranker.txt"))
        np.savez(tmp / "interactions.npz", user=data.user, item=data.item, rating=data.rating, time=data.time,
                 users=np.array(data.users, dtype=object).astype(str))
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as f:
            for i, item in enumerate(items.ids):
                year = None if math.isnan(items.years[i]) else float(items.years[i])
                f.write(json.dumps({"item": item, "title": items.titles[i], "genres": sorted(items.genres[i]),
                                    "year": year}) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps({
            "format": FORMAT, "config": to_json(config), "valid": result.valid, "test": result.test,
            "ranker_rounds": result.ranker_rounds, "seconds": seconds, "items": len(items.ids), "users": len(data.users),
            "interactions": len(data)}, indent=2))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _line(m: dict[str, float]) -> str:
    return f"HR@10 {m['hr@10']:.4f}, NDCG@10 {m['ndcg@10']:.4f}, MRR@10 {m['mrr@10']:.4f} ({m['users']} users)"


class Recommender:
    """A fitted recommender directory, loaded for queries."""

    def __init__(self, path: Path, config: RecommenderConfig, meta: dict[str, Any], items: ItemTable,
                 data: Interactions, engine: Engine) -> None:
        self.path, self.config, self.meta, self.items, self.data, self.engine = path, config, meta, items, data, engine
        self.user_index = {u: i for i, u in enumerate(data.users)}
        self.item_index = items.index()
        self.histories = user_sequences(data)

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        import lightgbm as lgb

        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise LmkError(f"{path}: not a recommender directory (no {CONFIG_FILE}; make one with `lmk recommend fit`)")
        try:
            meta = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise LmkError(f"{config_file}: not JSON ({exc.msg})") from None
        if meta.get("format") != FORMAT:
            raise LmkError(f"{config_file}: format {meta.get('format')!r}; this lmkernel reads format {FORMAT}")
        missing = [n for n in ("items.jsonl", "interactions.npz", "vectors.npy", "ranker.txt", "encoder")
                   if not (path / n).exists()]
        if missing:
            raise LmkError(f"{path}: incomplete recommender directory, missing {', '.join(missing)}")
        config = from_json(meta["config"])
        rows = [json.loads(line) for line in (path / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
        items = ItemTable([r["item"] for r in rows], [r["title"] for r in rows], [frozenset(r["genres"]) for r in rows],
                          np.array([math.nan if r["year"] is None else r["year"] for r in rows], dtype=np.float64))
        with np.load(path / "interactions.npz") as z:
            data = Interactions([str(u) for u in z["users"]], z["user"], z["item"], z["rating"], z["time"])
        vectors = np.load(path / "vectors.npy")
        if vectors.shape[0] != len(items.ids):
            raise LmkError(f"{path}: vectors.npy has {vectors.shape[0]} rows for {len(items.ids)} items")
        clock = PopularityClock(data, np.arange(len(data)), len(items.ids))
        engine = Engine(items, vectors, clock, config, lgb.Booster(model_file=str(path / "ranker.txt")))
        return cls(path, config, meta, items, data, engine)

    def query(self, user: str, k: int = 10, now: float | None = None) -> list[dict[str, Any]]:
        """The top `k` unseen items for a known user, as of `now` (default: just after the latest interaction)."""
        if user not in self.user_index:
            raise LmkError(f"user {user!r} has no interactions in {self.path}")
        if not 1 <= k <= 1000:
            raise LmkError(f"k must be from 1 to 1000; got {k}")
        u = self.user_index[user]
        rows = self.histories[u]
        when = float(self.data.time.max()) + 1 if now is None else float(now)
        rows = rows[self.data.time[rows] < when] if now is not None else rows
        if len(rows) == 0:
            raise LmkError(f"user {user!r} has no interactions before time {when}")
        moment = Moment(self.data.item[rows], self.data.time[rows], when)
        seen = self.data.item[self.histories[u]]  # never recommend anything the user has seen
        group = self.engine.group(moment, seen, u)
        ranked = self.engine.order(group)
        if len(ranked) < k:  # fill from the rest of the catalogue by similarity
            rest = [i for i in np.argsort(-(self.engine.vectors @ self.engine.vectors[ranked[:1]].T).ravel())
                    if i not in set(ranked.tolist()) | set(seen.tolist())]
            ranked = np.concatenate([ranked, np.array(rest[: k - len(ranked)], dtype=np.int64)])
        return [{"item": self.items.ids[i], "title": self.items.titles[i], "rank": r + 1}
                for r, i in enumerate(ranked[:k].tolist())]

    def _split_engine(self) -> tuple[Engine, list[np.ndarray], Any]:
        split = leave_one_out(self.data)
        by_user, _, _ = split_rows(self.data, split, self.config.ranker_targets)
        engine = Engine(self.items, self.engine.vectors, PopularityClock(self.data, split.train, len(self.items.ids)),
                        self.config, self.engine.ranker)
        return engine, by_user, split

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Valid and test metrics recomputed from the directory (the split is a function of the data)."""
        engine, by_user, split = self._split_engine()
        return {name: metrics(engine, build_groups(engine, self.data, by_user, rows.tolist()))
                for name, rows in (("valid", split.valid), ("test", split.test))}

    def test_top(self, k: int = 10) -> dict[str, list[str]]:
        """Each test user's top `k` item ids, as evaluated (for scoring subsets such as cold items)."""
        engine, by_user, split = self._split_engine()
        groups = build_groups(engine, self.data, by_user, split.test.tolist())
        return {self.data.users[g.user]: [self.items.ids[i] for i in engine.order(g)[:k]] for g in groups}
