"""What the re-ranker sees of a (user, candidate item) pair at a moment `now`: the encoder's similarities,
the item's popularity up to `now` (all time, last 30 and 7 days: nothing after `now` is counted), how new
the item is, genre overlap with the user's history, the item's mean rating, and the user's activity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmkernel.apps.recommend_data import Interactions, ItemTable

DAY = 86_400.0
FEATURES = ("sim_user", "sim_last", "sim_max5", "ann_rank", "pop_all", "pop_30d", "pop_7d", "item_age_days",
            "release_gap_years", "genre_overlap", "mean_rating", "user_activity", "days_since_last", "from_popular")


class PopularityClock:
    """Counts of each item's interactions before a moment, from interactions sorted by time."""

    def __init__(self, data: Interactions, rows: np.ndarray, num_items: int) -> None:
        order = rows[np.argsort(data.time[rows], kind="stable")]
        self.times, self.items, self.ratings = data.time[order], data.item[order], data.rating[order]
        self.num_items = num_items
        first = np.full(num_items, np.inf)
        np.minimum.at(first, self.items, self.times)
        self.first_seen = first

    def counts(self, before: float, since: float = -np.inf) -> np.ndarray:
        lo, hi = np.searchsorted(self.times, [since, before], side="left")
        return np.bincount(self.items[lo:hi], minlength=self.num_items).astype(np.float32)

    def mean_rating(self, before: float) -> np.ndarray:
        hi = np.searchsorted(self.times, before, side="left")
        sums = np.bincount(self.items[:hi], weights=self.ratings[:hi], minlength=self.num_items)
        counts = np.bincount(self.items[:hi], minlength=self.num_items)
        overall = float(self.ratings[:hi].mean()) if hi else 0.0
        return np.where(counts > 0, sums / np.maximum(counts, 1), overall).astype(np.float32)


@dataclass
class Moment:
    """A user at a time: their items so far (time order) and when each happened."""

    items: np.ndarray
    times: np.ndarray
    now: float


def user_vector(vectors: np.ndarray, items: np.ndarray, history: int, decay: float) -> np.ndarray:
    """Recency-weighted mean of the last `history` item vectors, normalised."""
    recent = items[-history:]
    weights = decay ** np.arange(len(recent))[::-1]
    v = (vectors[recent] * weights[:, None]).sum(0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def features(moment: Moment, candidates: np.ndarray, ann_rank: np.ndarray, from_popular: np.ndarray,
             user_vec: np.ndarray, vectors: np.ndarray, clock: PopularityClock, items: ItemTable) -> np.ndarray:
    """[len(candidates), len(FEATURES)] float32."""
    now = moment.now
    cand = vectors[candidates]
    last = vectors[moment.items[-5:]]
    sims = cand @ last.T
    pop_all = clock.counts(now)
    pop_30 = clock.counts(now, now - 30 * DAY)
    pop_7 = clock.counts(now, now - 7 * DAY)
    first = clock.first_seen[candidates]
    age = np.where(np.isfinite(first) & (first < now), (now - first) / DAY, -1.0)
    now_year = 1970 + now / (365.25 * DAY)
    gap = np.nan_to_num(now_year - items.years[candidates], nan=-1.0)
    liked: dict[str, float] = {}
    for i in moment.items[-50:]:
        for g in items.genres[i]:
            liked[g] = liked.get(g, 0.0) + 1.0
    norm = max(sum(v * v for v in liked.values()) ** 0.5, 1e-9)
    overlap = np.array([sum(liked.get(g, 0.0) for g in items.genres[c]) / (norm * max(len(items.genres[c]), 1) ** 0.5)
                        for c in candidates], dtype=np.float32)
    since_last = (now - moment.times[-1]) / DAY if len(moment.times) else -1.0
    columns = [cand @ user_vec, sims[:, -1], sims.max(1), ann_rank, np.log1p(pop_all[candidates]),
               np.log1p(pop_30[candidates]), np.log1p(pop_7[candidates]), age, gap, overlap,
               clock.mean_rating(now)[candidates], np.full(len(candidates), np.log1p(len(moment.items))),
               np.full(len(candidates), since_last), from_popular]
    return np.stack([np.asarray(c, dtype=np.float32) for c in columns], axis=1)
