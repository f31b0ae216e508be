"""`lmk bench recommend --peer recbole`: lmkernel's recommender against RecBole's Pop, ItemKNN, BPR and SASRec
on MovieLens-100k (read from the installed recbole package), the same leave-one-out split, one table.

Both sides read the same interactions, written here from the package's copy with each timestamp replaced
by its rank in (time, file order) for RecBole (see `prepare`), so that "the last interaction by time" is
the same item for both (checked: the two splits' test items agree for every user). Every side's top 10 for each test user
is scored by the same code, on all test users and on the cold-start subset: a tenth of the items (seeded)
lose every interaction that is not some user's test item, so those users' answers were never seen in
training and only their text can bring them up.
"""

from __future__ import annotations

import json
import math
import random
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmkernel.apps.recommend_data import Interactions, ItemTable, leave_one_out, user_sequences

if TYPE_CHECKING:
    from lmkernel.apps.recommender import RecommenderConfig

PEERS = ("Pop", "ItemKNN", "BPR", "SASRec")


@dataclass
class Prepared:
    data: Interactions
    items: ItemTable
    data_dir: Path  # a RecBole dataset directory holding <name>.inter
    targets: dict[str, str]  # test user -> test item
    cold_users: set[str]  # test users whose test item is cold
    cold_items: set[str]


def prepare(data: Interactions, items: ItemTable, root: Path, name: str, cold_fraction: float, seed: int) -> Prepared:
    """(With `cold_fraction`) cold items, then the interactions written as root/name/name.inter with each
    timestamp replaced by its rank in (time, file order): RecBole keeps times as float32, which cannot tell
    apart seconds near 9e8 (it would sort 64-second blocks arbitrarily), while ranks up to 2**24 are exact,
    and the order they give is the one lmkernel's split uses."""
    cold: set[int] = set()
    if cold_fraction:
        cold = set(random.Random(seed).sample(range(len(items.ids)), round(cold_fraction * len(items.ids))))  # nosec B311  # seeded order for data and benchmarks, not a secret
        last = {int(seq[-1]) for seq in user_sequences(data) if len(seq)}
        keep = np.array([int(i) not in cold or r in last for r, i in enumerate(data.item)])
        data = data.subset(keep)
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name}.inter").open("w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        rank = np.empty(len(data), dtype=np.int64)
        rank[np.lexsort((np.arange(len(data)), data.time))] = np.arange(len(data))
        for u, i, r, t in zip(data.user, data.item, data.rating, rank):
            f.write(f"{data.users[u]}\t{items.ids[i]}\t{float(r):g}\t{int(t)}\n")
    split = leave_one_out(data)
    targets = {data.users[data.user[r]]: items.ids[data.item[r]] for r in split.test}
    cold_ids = {items.ids[i] for i in cold}
    return Prepared(data, items, directory, targets, {u for u, i in targets.items() if i in cold_ids}, cold_ids)


def score(top10: dict[str, list[str]], targets: dict[str, str], users: set[str] | None = None) -> dict[str, float]:
    """HR@10, NDCG@10 and MRR@10 of top-10 lists against the test items (over `users`, default all)."""
    chosen = [u for u in targets if users is None or u in users]
    hr = ndcg = mrr = 0.0
    for u in chosen:
        top = top10.get(u, [])
        if targets[u] in top:
            rank = top.index(targets[u]) + 1
            hr, ndcg, mrr = hr + 1, ndcg + 1 / math.log2(rank + 1), mrr + 1 / rank
    n = max(len(chosen), 1)
    return {"hr@10": hr / n, "ndcg@10": ndcg / n, "mrr@10": mrr / n, "users": len(chosen)}


def run_peer(model: str, prepared: Prepared, timeout: float) -> dict:
    """One RecBole model in a child process; its JSON result (test metrics, top 10 per test user, time)."""
    out = prepared.data_dir.parent / f"{prepared.data_dir.name}-{model}.json"
    proc = subprocess.run([sys.executable, "-m", "lmkernel.bench.recbole_peer", model, str(prepared.data_dir), str(out)],  # nosec B603  # an argument list this module builds, no shell
                          capture_output=True, text=True, timeout=timeout,
                          cwd=prepared.data_dir.parent)  # RecBole writes log/ and log_tensorboard/ where it runs
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"RecBole {model} failed: {' | '.join(tail)}")
    return json.loads(out.read_text())


def run_ours(prepared: Prepared, config, work: Path, log) -> dict:
    """lmkernel's recommender fitted on the same interactions; its test top 10 per user and time."""
    from lmkernel.apps.recommend_store import Recommender, fit

    start = time.monotonic()
    out = work / f"lmkernel-{prepared.data_dir.name}"
    result = fit(prepared.data, prepared.items, out, config, overwrite=True, log=log)
    top = Recommender.load(out).test_top(10)
    return {"model": "lmkernel", "test_reported": result.test, "top10": top, "seconds": time.monotonic() - start}


def run_models(prepared: Prepared, config: RecommenderConfig, root: Path, models: list[str], timeout: float,
               log: Callable[[str], object]) -> tuple[list[dict], list[str]]:
    """lmkernel, then each RecBole model, on one prepared split: their results, and a line for each peer that
    failed or ran out of time (reported, not fatal: the others are still compared)."""
    results = [run_ours(prepared, config, root, lambda line: log(f"  lmkernel: {line}"))]
    failed = []
    for model in models:
        log(f"  running RecBole {model} ...")
        try:
            results.append(run_peer(model, prepared, timeout))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            failed.append(f"{model}: {exc}")
    return results, failed


def temp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lmk-bench-recommend-"))
