"""GGUF vocabularies: the pre-tokenizer splits, GPT-2's byte alphabet, merges rebuilt from scores."""

from __future__ import annotations

from lmkernel.loader.gguf_vocab import _byte_alphabet, _merges_from_scores


def test_gguf_split_rules_are_transformers():
    """Every `tokenizer.ggml.pre` split transformers knows, with the same regex (catches drift on upgrades)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from lmkernel.loader.gguf_vocab import _PRE_SPLITS

    assert {name: _PRE_SPLITS.get(name) for name in GGUF_PRE_TOKENIZER_SPLITS} == GGUF_PRE_TOKENIZER_SPLITS


def test_byte_alphabet_is_gpt2s():
    table = _byte_alphabet()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert (table[ord("!")], table[ord("~")], table[ord("¡")], table[ord("ÿ")]) == ("!", "~", "¡", "ÿ")
    assert (table[0], table[ord("\n")], table[ord(" ")], table[127], table[173]) == ("Ā", "Ċ", "Ġ", "ġ", "Ń")


def test_merges_from_scores_best_score_first_then_longer_left_piece():
    vocab = {"a": 0, "b": 1, "ab": 2, "abc": 3, "c": 4, "bc": 5}
    scores = {"ab": -1.0, "abc": -0.5, "bc": -2.0, "a": 0.0}
    assert _merges_from_scores(vocab, scores) == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]
    assert _merges_from_scores({"x": 0, "yz": 1}, {"xyz": 1.0, "xy": 0.5, "yz": 0.2}) == [("x", "yz")]  # "y" unknown
