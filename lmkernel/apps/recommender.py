"""`lmk recommend`: items recommended from their text and from what users did.

Fit: the encoder is fine-tuned on behaviour (`item_encoder.py`), every item's text becomes a vector in a FAISS
index, a user is the recency-weighted mean of their last items, and the candidates are the index's nearest
unseen items plus the items popular in the last 30 days; a LightGBM LambdaRank model re-ranks them on the
features of `rank_features.py`. The ranker learns from each user's last training items (the encoder never
saw those pairs), stops early on the validation items and is scored on the test items (RecBole's leave-one-out
split, full ranking: every unseen item is ranked, the candidates by the ranker and the rest after them).
Items the user has seen are never recommended; an item with text and no interactions is in the index from
the start, so it can be recommended through its text alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmkernel.apps.item_encoder import EncoderTraining, behaviour_pairs
from lmkernel.apps.rank_features import DAY, FEATURES, Moment, PopularityClock, features, user_vector
from lmkernel.apps.recommend_data import Interactions, ItemTable, Split, user_sequences
from lmkernel.errors import LmkError

K = 10


@dataclass(frozen=True)
class RecommenderConfig:
    encoder: str = "all-minilm-l6-v2"
    encoder_training: EncoderTraining = field(default_factory=EncoderTraining)
    history: int = 20  # items in the user vector
    decay: float = 0.9  # weight of each older item in the user vector
    candidates: int = 200  # nearest unseen items from the index
    popular_candidates: int = 50  # most popular unseen items of the last 30 days
    ranker_targets: int = 3  # each user's last training items the ranker learns from
    ranker_rounds: int = 600
    ranker_lr: float = 0.05
    new_item_slots: int = 1  # places of the top 10 kept for items with no interactions yet (0: none)
    seed: int = 0

    def check(self) -> RecommenderConfig:
        for name in ("history", "candidates", "ranker_targets", "ranker_rounds"):
            if getattr(self, name) < 1:
                raise LmkError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.candidates < K:
            raise LmkError(f"--candidates must be at least {K}; got {self.candidates}")
        if not 0 < self.decay <= 1:
            raise LmkError(f"--decay must be in (0, 1]; got {self.decay}")
        return self


@dataclass
class Group:
    """One ranking question: a user at a moment, the candidates, their features and (when known) the answer."""

    user: int
    candidates: np.ndarray
    features: np.ndarray
    target: int | None = None


class Engine:
    """What ranking needs at query time: item vectors and index, the popularity clock and the ranker."""

    def __init__(self, items: ItemTable, vectors: np.ndarray, clock: PopularityClock, config: RecommenderConfig,
                 ranker: Any = None) -> None:
        import faiss

        self.items, self.vectors, self.clock, self.config, self.ranker = items, vectors, clock, config, ranker
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def group(self, moment: Moment, exclude: np.ndarray, user: int, target: int | None = None) -> Group:
        cfg = self.config
        uvec = user_vector(self.vectors, moment.items, cfg.history, cfg.decay)
        seen = set(exclude.tolist())
        want = min(cfg.candidates + len(seen), len(self.items.ids))
        _, found = self.index.search(uvec[None, :], want)
        near = [int(i) for i in found[0] if i >= 0 and int(i) not in seen][: cfg.candidates]
        # The nearest neighbours of each of the last five items too: a mean of twenty items sits near the
        # centre of the catalogue and misses what is close to one of them.
        _, around = self.index.search(np.ascontiguousarray(self.vectors[moment.items[-5:]]), 20 + len(seen))
        taken = set(near)
        for row in around:
            fresh = [int(i) for i in row if i >= 0 and int(i) not in seen and int(i) not in taken][:20]
            near.extend(fresh)
            taken.update(fresh)
        recent = self.clock.counts(moment.now, moment.now - 30 * DAY)
        popular = [int(i) for i in np.argsort(-recent, kind="stable") if int(i) not in seen and recent[i] > 0]
        extra = [i for i in popular[: cfg.popular_candidates + 2 * cfg.candidates] if i not in taken][: cfg.popular_candidates]
        candidates = np.array(near + extra, dtype=np.int64)
        rank = np.array([min(r, cfg.candidates) for r in range(len(near))] + [cfg.candidates] * len(extra), dtype=np.float32)
        flag = np.array([0.0] * len(near) + [1.0] * len(extra), dtype=np.float32)
        return Group(user, candidates, features(moment, candidates, rank, flag, uvec, self.vectors, self.clock,
                                                self.items), target)

    def order(self, group: Group) -> np.ndarray:
        """The group's candidates, best first. The ranker judges items by behaviour it has seen, so items with no
        interaction yet would never surface; the last `new_item_slots` places of the top 10 go to the unseen
        candidates without interactions that are most similar to the user by text, when the ranker left none there."""
        scores = self.ranker.predict(group.features) if self.ranker is not None else group.features[:, 0]
        ranked = group.candidates[np.argsort(-scores, kind="stable")]
        slots = self.config.new_item_slots
        if not slots:
            return ranked
        new = group.features[:, FEATURES.index("pop_all")] == 0
        top = ranked[:K].tolist()
        if set(top) & set(group.candidates[new].tolist()):
            return ranked
        close = group.features[:, FEATURES.index("sim_max5")]  # to one of the user's last five items
        sim = dict(zip(group.candidates.tolist(), close.tolist()))
        floor = min(sim[i] for i in top)  # a new item must be as close to the user as the ranked ones are
        fresh = group.candidates[new][np.argsort(-close[new], kind="stable")][:slots].tolist()
        fresh = [i for i in fresh if i not in top and sim[i] >= floor]
        if not fresh:
            return ranked
        head = top[: K - len(fresh)] + fresh
        rest = [i for i in ranked.tolist() if i not in set(head)]
        return np.array(head + rest, dtype=np.int64)


def metrics(engine: Engine, groups: list[Group]) -> dict[str, float]:
    """HR@10, NDCG@10 and MRR@10 over groups with a target (a target outside the candidates is a miss)."""
    hr = ndcg = mrr = 0.0
    for g in groups:
        top = engine.order(g)[:K].tolist()
        if g.target in top:
            rank = top.index(g.target) + 1
            hr, ndcg, mrr = hr + 1, ndcg + 1 / math.log2(rank + 1), mrr + 1 / rank
    n = max(len(groups), 1)
    return {"hr@10": hr / n, "ndcg@10": ndcg / n, "mrr@10": mrr / n, "users": len(groups)}


def moments(data: Interactions, rows_by_user: list[np.ndarray], targets: list[int]) -> list[tuple[int, Moment, np.ndarray]]:
    """(user, moment just before the target row, the target row) for each target row index."""
    out = []
    for row in targets:
        user = int(data.user[row])
        seq = rows_by_user[user]
        before = seq[: int(np.nonzero(seq == row)[0][0])]
        out.append((user, Moment(data.item[before], data.time[before], float(data.time[row])), row))
    return out


def build_groups(engine: Engine, data: Interactions, rows_by_user: list[np.ndarray], targets: list[int]) -> list[Group]:
    return [engine.group(m, m.items, user, int(data.item[row])) for user, m, row in moments(data, rows_by_user, targets)]


def train_ranker(train: list[Group], valid: list[Group], config: RecommenderConfig) -> Any:
    """LightGBM LambdaRank on the groups whose answer is among the candidates; early stopping on valid NDCG@10."""
    import lightgbm as lgb

    def stack(groups: list[Group]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        kept = [g for g in groups if g.target in set(g.candidates.tolist())]
        if not kept:
            raise LmkError("no ranking question has its answer among the candidates; raise --candidates")
        x = np.concatenate([g.features for g in kept])
        y = np.concatenate([(g.candidates == g.target).astype(np.int32) for g in kept])
        return x, y, [len(g.candidates) for g in kept]

    xt, yt, gt = stack(train)
    xv, yv, gv = stack(valid)
    ranker = lgb.LGBMRanker(objective="lambdarank", n_estimators=config.ranker_rounds, learning_rate=config.ranker_lr,
                            num_leaves=31, min_child_samples=20, subsample=0.8, subsample_freq=1, colsample_bytree=0.9,
                            random_state=config.seed, verbose=-1, n_jobs=2)
    ranker.fit(xt, yt, group=gt, eval_X=(xv,), eval_y=(yv,), eval_group=[gv], eval_at=[K], feature_name=list(FEATURES),
               callbacks=[lgb.early_stopping(50, verbose=False)])
    return ranker.booster_


@dataclass
class FitResult:
    valid: dict[str, float]
    test: dict[str, float]
    encoder_losses: list[float]
    ranker_rounds: int
    seconds: dict[str, float]


def split_rows(data: Interactions, split: Split, ranker_targets: int) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Rows by user (time order); the encoder's rows (training without each user's last `ranker_targets`
    training items); the ranker's target rows (those items)."""
    by_user = user_sequences(data)
    train_by_user = user_sequences(data, split.train)
    encoder_rows, ranker_rows = [], []
    for seq in train_by_user:
        cut = max(1, len(seq) - ranker_targets)
        encoder_rows.append(seq[:cut])
        ranker_rows.extend(int(r) for r in seq[cut:])
    return by_user, np.concatenate(encoder_rows) if encoder_rows else np.zeros(0, np.int64), ranker_rows


def to_json(config: RecommenderConfig) -> dict[str, Any]:
    return asdict(config)


def from_json(values: dict[str, Any]) -> RecommenderConfig:
    values = dict(values)
    values["encoder_training"] = EncoderTraining(**values.get("encoder_training", {}))
    return RecommenderConfig(**values)


def encoder_pairs(data: Interactions, rows: np.ndarray, window: int) -> np.ndarray:
    return behaviour_pairs([data.item[s] for s in user_sequences(data, rows)], window)

