"""Training data: files read with their line numbers and checked before any training starts, chat
turns labelled for the loss, sequences packed and batched by length, and the optional text
augmentation for classification.

Every random choice here is a function of (seed, epoch, index), so a resumed run, or the same run
split over several processes, sees exactly the same batches.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer

IGNORE = -100  # the label of a token that is not scored (as in PyTorch's cross-entropy and Hugging Face)
BUCKET_WINDOW = 50  # global batches sorted by length together: little padding, order still random


class DataError(LmkError):
    """A training or evaluation file that cannot be used: which file, which line, what was expected."""


@dataclass(frozen=True)
class Row:
    """One record of a JSONL or CSV file and the line it starts on."""

    line: int
    fields: Mapping[str, Any]


def _read_text(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise DataError(f"{flag} {path}: the file is empty")
    return text


def read_rows(path: Path, flag: str) -> list[Row]:
    """Records of a `.jsonl` file (one JSON object a line; blank lines skipped) or a `.csv` file
    with a header row."""
    text = _read_text(path, flag)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = []
        try:
            for record in reader:
                if None in record or any(v is None for v in record.values()):
                    raise DataError(f"{flag} {path}, line {reader.line_num}: expected {len(reader.fieldnames or [])} "
                                    f"columns ({', '.join(reader.fieldnames or [])}) as in the header")
                rows.append(Row(reader.line_num, record))
        except csv.Error as exc:
            raise DataError(f"{flag} {path}, line {reader.line_num}: not valid CSV ({exc})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{flag} {path}, line {number}: not JSON ({exc.msg}); expected one object a line") from None
            if not isinstance(record, dict):
                raise DataError(f"{flag} {path}, line {number}: expected a JSON object, got {type(record).__name__}")
            rows.append(Row(number, record))
    if not rows:
        raise DataError(f"{flag} {path}: no records in the file")
    return rows


def read_plain_text(path: Path, flag: str) -> list[Row]:
    """Non-empty lines of a plain text file, each a row with a "text" field."""
    lines = _read_text(path, flag).splitlines()
    return [Row(n, {"text": line}) for n, line in enumerate(lines, 1) if line.strip()]


def field(row: Row, name: str, kind: type | tuple[type, ...], path: Path, flag: str) -> Any:
    """`row.fields[name]`, which must be present and of `kind`, or a DataError naming file and line."""
    if name not in row.fields:
        have = ", ".join(map(str, row.fields)) or "none"
        raise DataError(f"{flag} {path}, line {row.line}: missing the '{name}' field (fields present: {have})")
    value = row.fields[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{flag} {path}, line {row.line}: '{name}' must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "list": "a list"}.get(k.__name__, k.__name__) for k in kinds)


def chat_tokens(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the model's chat template, and labels that score only the
    assistant turns (their text and the template's end-of-turn), IGNORE elsewhere."""
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn; there is nothing to learn from it")
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else 0
            end = len(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
            spans.append((start, end))
    text = str(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE
        for token, (begin, _) in zip(encoding.ids, encoding.offsets)
    ]
    return list(encoding.ids), labels


def holdout_split(n: int, fraction: float, seed: int, labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Indices of `n` examples split into (kept, held out): `fraction` of them held out at random with `seed`,
    within each label when `labels` are given (so the held-out split keeps the label shares)."""
    rng = random.Random(seed)  # nosec B311  # seeded order for data and benchmarks, not a secret
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)
    held: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        held.extend(members[: round(fraction * len(members))])
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most `max_length` tokens, in order, first fit.

    Each sequence keeps its own attention span inside the row (the models attend per sequence),
    so packing saves padding without letting one example see another.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """Item indices of every global batch of one epoch: shuffled by (seed, epoch); with `by_length`,
    windows of BUCKET_WINDOW batches are sorted by length so a batch pads little, and the batches
    are shuffled again so lengths do not come in order."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")  # nosec B311  # seeded order for data and benchmarks, not a secret
    rng.shuffle(order)
    if by_length:
        window = batch_size * BUCKET_WINDOW
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lengths.__getitem__)]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if by_length:
        rng.shuffle(batches)
    return batches


def split_batch(items: Sequence[int], parts: int) -> list[list[int]]:
    """A global batch cut into `parts` contiguous micro-batches (some may be empty)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(list(items[start:end]))
        start = end
    return out


def augment(texts: Sequence[str], labels: Sequence[int], seed: int, copies: int = 1) -> tuple[list[str], list[int]]:
    """Extra training sentences for classification: each original is kept and gets `copies` variants,
    one of random deletion (each word dropped with p=0.1), random swap (two words exchanged) or mixing
    (the first half of its words followed by the second half of another sentence with the same label)."""
    rng = random.Random(f"augment:{seed}")  # nosec B311  # seeded order for data and benchmarks, not a secret
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    out_texts, out_labels = list(texts), list(labels)
    for i, (text, label) in enumerate(zip(texts, labels)):
        words = text.split()
        for _ in range(copies):
            kind = rng.choice(("delete", "swap", "mix"))
            if kind == "delete":
                kept = [w for w in words if rng.random() >= 0.1]
                new = kept or words[:1]
            elif kind == "swap" and len(words) > 1:
                a, b = rng.sample(range(len(words)), 2)
                new = list(words)
                new[a], new[b] = new[b], new[a]
            else:
                other = texts[rng.choice(by_label[label])].split()
                new = words[: (len(words) + 1) // 2] + other[len(other) // 2 :]
            out_texts.append(" ".join(new))
            out_labels.append(label)
    return out_texts, out_labels
