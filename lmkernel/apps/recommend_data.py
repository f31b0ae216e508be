"""The recommender's data: interactions (user, item, rating, time) and item texts, read from CSV, JSON lines
or RecBole's atomic files, and RecBole's leave-one-out split (per user, by time: the last interaction is the
test item, the one before it the validation item, the rest is training)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmkernel.train.data import DataError, read_rows

USER_COLUMNS = ("user", "user_id")
ITEM_COLUMNS = ("item", "item_id")
TIME_COLUMNS = ("time", "timestamp")
TEXT_COLUMNS = ("text", "title", "movie_title")
GENRE_COLUMNS = ("genres", "genre", "class")
YEAR_COLUMNS = ("year", "release_year")


@dataclass
class ItemTable:
    """The catalogue: every item that can be recommended, with the text it is encoded from."""

    ids: list[str]
    titles: list[str]
    genres: list[frozenset[str]]
    years: np.ndarray  # float, NaN where unknown

    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.ids)}

    def text(self, i: int) -> str:
        """What the encoder reads for item i: its title, year and genres."""
        year = "" if math.isnan(self.years[i]) else f" ({int(self.years[i])})"
        genres = f". Genres: {', '.join(sorted(self.genres[i]))}." if self.genres[i] else ""
        return f"{self.titles[i]}{year}{genres}"

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self.ids))]


@dataclass
class Interactions:
    """Interactions as parallel arrays over user and item indices (items index the `ItemTable`)."""

    users: list[str]  # user index -> id
    user: np.ndarray  # int64
    item: np.ndarray  # int64
    rating: np.ndarray  # float32 (1 where the data has none)
    time: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask: np.ndarray) -> Interactions:
        return Interactions(self.users, self.user[mask], self.item[mask], self.rating[mask], self.time[mask])


@dataclass
class Split:
    """Leave-one-out by time: index arrays into the interactions, and each user's items in time order."""

    train: np.ndarray
    valid: np.ndarray  # one per user with at least 3 interactions
    test: np.ndarray


def _rows(path: Path, flag: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, fields as text) of a RecBole atomic file (tab-separated, a `name:type` header) or of the CSV and
    JSON-lines files `lmk train` reads."""
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".inter", ".item"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = [h.split(":")[0] for h in next(reader, [])]
            for number, values in enumerate(reader, 2):
                if values:
                    yield number, dict(zip(header, values))
        return
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{flag} {path}: expected a .csv, .jsonl, or RecBole .inter/.item file")
    for row in read_rows(path, flag):
        yield row.line, {k: "" if v is None else (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                         for k, v in row.fields.items()}


def _pick(fields: dict[str, str], names: tuple[str, ...], path: Path, flag: str, line: int, required: bool = True) -> str | None:
    for name in names:
        if name in fields and fields[name] != "":
            return fields[name]
    if required:
        raise DataError(f"{flag} {path}, line {line}: missing the '{names[0]}' field (or {', '.join(names[1:])}); "
                        f"fields present: {', '.join(fields) or 'none'}")
    return None


def _number(value: str | None, name: str, path: Path, flag: str, line: int, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{flag} {path}, line {line}: '{name}' must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{flag} {path}, line {line}: '{name}' must be finite; got {value!r}")
    return number


def _year(value: str | None) -> float:
    """A release year, or NaN where the data says it is unknown (any text that is not a number)."""
    try:
        year = float(value) if value is not None else math.nan
    except ValueError:
        return math.nan
    return year if math.isfinite(year) else math.nan


def read_items(path: Path, flag: str = "--items") -> ItemTable:
    """Items with "item" and "text" (or title) and optional "genres" (space- or |-separated) and "year"."""
    ids, titles, genres, years = [], [], [], []
    seen: set[str] = set()
    for line, fields in _rows(path, flag):
        item = _pick(fields, ITEM_COLUMNS, path, flag, line)
        if item in seen:
            raise DataError(f"{flag} {path}, line {line}: item {item!r} is listed twice")
        seen.add(item)
        ids.append(item)
        titles.append(_pick(fields, TEXT_COLUMNS, path, flag, line).strip())
        raw = _pick(fields, GENRE_COLUMNS, path, flag, line, required=False) or ""
        genres.append(frozenset(g for g in raw.replace("|", " ").split() if g))
        years.append(_year(_pick(fields, YEAR_COLUMNS, path, flag, line, required=False)))
    if not ids:
        raise DataError(f"{flag} {path}: no items")
    return ItemTable(ids, titles, genres, np.array(years, dtype=np.float64))


def read_interactions(path: Path, items: ItemTable, flag: str = "--interactions") -> Interactions:
    """Interactions with "user", "item", "time" and an optional "rating"; every item must be in the catalogue."""
    index = items.index()
    users: dict[str, int] = {}
    u, i, r, t = [], [], [], []
    for line, fields in _rows(path, flag):
        user = _pick(fields, USER_COLUMNS, path, flag, line)
        item = _pick(fields, ITEM_COLUMNS, path, flag, line)
        if item not in index:
            raise DataError(f"{flag} {path}, line {line}: item {item!r} is not in the items file")
        u.append(users.setdefault(user, len(users)))
        i.append(index[item])
        r.append(_number(_pick(fields, ("rating",), path, flag, line, required=False), "rating", path, flag, line, 1.0))
        t.append(_number(_pick(fields, TIME_COLUMNS, path, flag, line), "time", path, flag, line, 0.0))
    if not u:
        raise DataError(f"{flag} {path}: no interactions")
    return Interactions(list(users), np.array(u, dtype=np.int64), np.array(i, dtype=np.int64),
                        np.array(r, dtype=np.float32), np.array(t, dtype=np.float64))


def user_sequences(data: Interactions, rows: np.ndarray | None = None) -> list[np.ndarray]:
    """For each user, the row indices of their interactions in time order (ties in file order)."""
    rows = np.arange(len(data)) if rows is None else rows
    order = rows[np.lexsort((rows, data.time[rows], data.user[rows]))]
    bounds = np.searchsorted(data.user[order], np.arange(len(data.users) + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(len(data.users))]


def leave_one_out(data: Interactions) -> Split:
    """RecBole's protocol: per user, the last interaction by time is the test item and the one before it the
    validation item; users with fewer than three interactions stay wholly in training."""
    train, valid, test = [], [], []
    for seq in user_sequences(data):
        if len(seq) < 3:
            train.extend(seq)
            continue
        train.extend(seq[:-2])
        valid.append(seq[-2])
        test.append(seq[-1])
    return Split(np.sort(np.array(train, dtype=np.int64)), np.array(valid, dtype=np.int64), np.array(test, dtype=np.int64))


def movielens_100k() -> tuple[Path, Path]:
    """The MovieLens-100k interactions and items shipped inside the `recbole` wheel (`pip install 'lmkernel[recommend]'`)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise DataError("MovieLens-100k is read from the recbole package: pip install 'lmkernel[recommend]'")
    root = Path(spec.origin).parent / "dataset_example" / "ml-100k"
    return root / "ml-100k.inter", root / "ml-100k.item"
