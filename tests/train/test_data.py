"""Reading, checking, packing, batching and augmenting training data."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.train.data import (IGNORE, DataError, augment, chat_tokens, epoch_batches, pack, read_rows,
                                 split_batch)


def test_jsonl_errors_name_the_file_and_line(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        read_rows(empty, "--data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"--data .*bad\.jsonl, line 3: not JSON"):
        read_rows(bad, "--data")
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl", "--eval")


def test_csv_rows_keep_their_line_numbers_and_refuse_ragged_rows(tmp_path: Path):
    good = tmp_path / "good.csv"
    good.write_text('text,label\n"Profit rose, a lot",positive\nSales fell,negative\n')
    rows = read_rows(good, "--data")
    assert [(r.line, r.fields["text"], r.fields["label"]) for r in rows] == [
        (2, "Profit rose, a lot", "positive"), (3, "Sales fell", "negative")]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\nfine,positive\nno label here\n")
    with pytest.raises(DataError, match=r"ragged\.csv, line 3: expected 2 columns \(text, label\)"):
        read_rows(ragged, "--data")


def test_pack_fills_rows_first_fit_without_exceeding_the_length():
    lengths = [5, 3, 7, 2, 9, 1]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[0, 1, 3], [2, 5], [4]]


def test_epoch_batches_cover_every_item_once_and_depend_only_on_seed_and_epoch():
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    batches = epoch_batches(lengths, 16, seed=3, epoch=1, by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == epoch_batches(lengths, 16, seed=3, epoch=1, by_length=True)
    assert batches != epoch_batches(lengths, 16, seed=3, epoch=2, by_length=True)
    # Sorted within windows: a batch spans a narrow band of lengths compared with the data.
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches if len(b) == 16]
    assert sum(spreads) / len(spreads) < 10


def test_split_batch_gives_contiguous_parts_in_order():
    assert split_batch(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_batch([1], 2) == [[1], []]


def test_augment_keeps_originals_labels_and_is_seeded():
    texts = ["profit rose sharply in the quarter", "sales fell again this year", "the board met on monday"]
    labels = [0, 1, 2]
    out_texts, out_labels = augment(texts, labels, seed=1, copies=2)
    assert out_texts[:3] == texts and len(out_texts) == 9
    assert out_labels == [0, 1, 2, 0, 0, 1, 1, 2, 2]
    assert (out_texts, out_labels) == augment(texts, labels, seed=1, copies=2)
    assert all(set(new.split()) <= set(" ".join(texts).split()) for new in out_texts)


def test_chat_labels_score_only_the_assistant_turns(smollm_gguf: Path):
    from lmkernel.loader import gguf_file
    from lmkernel.loader.tokenizer import Tokenizer

    reader = gguf_file.open_reader(smollm_gguf)
    tokenizer = Tokenizer.from_gguf(gguf_file.read_metadata(reader), str(smollm_gguf))
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    ids, labels = chat_tokens(tokenizer, messages, "line 1")
    assert len(ids) == len(labels)
    scored = tokenizer.decode([t for t in labels if t != IGNORE])
    assert scored == "Four.<|im_end|>\nSix.<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    with pytest.raises(DataError, match="line 7: the conversation has no assistant turn"):
        chat_tokens(tokenizer, messages[:1], "line 7")
