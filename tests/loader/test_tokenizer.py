"""The tokenizer against Hugging Face's on the same files: ids, decoding, chat templates, streaming."""

from __future__ import annotations

import unicodedata

import pytest

from lmkernel.errors import LmkError, ModelSourceError
from lmkernel.loader.tokenizer import IncrementalDetokenizer, Tokenizer

HARD_STRINGS = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and 🤖!",
    "中文字符测试，日本語のテキスト。한국어 문장",
    "مرحبا بالعالم",
    unicodedata.normalize("NFD", "café naïve résumé Ångström"),
    "e\u0301\u0300\u0302 stacked combining accents",
    "tabs\t\tand\nnew\n\n\nlines\r\nwindows",
    " " * 64 + "after a long run of spaces",
    "digits 1234567890123 and 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|> spaced specials <|im_end|>",
    "don't I'll we've ME'LL",
    "\u200b zero width and \u00a0 no-break space",
]


@pytest.fixture(scope="module")
def smol_tok(smollm) -> Tokenizer:
    return smollm.tokenizer


@pytest.fixture(scope="module")
def mini_tok(minilm) -> Tokenizer:
    return minilm.tokenizer


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gguf_ids_match_transformers(smol_tok, hf_smollm_tokenizer, wikitext_lines, add_special_tokens):
    texts = wikitext_lines[:300] + HARD_STRINGS
    for text in texts:
        assert smol_tok.encode(text, add_special_tokens) == hf_smollm_tokenizer(
            text, add_special_tokens=add_special_tokens
        ).input_ids, repr(text)


def test_gguf_round_trip_and_decode_match(smol_tok, hf_smollm_tokenizer, wikitext_lines):
    for text in wikitext_lines[:50] + HARD_STRINGS:
        ids = smol_tok.encode(text)
        assert smol_tok.decode(ids) == text
        for skip in (False, True):
            assert smol_tok.decode(ids, skip) == hf_smollm_tokenizer.decode(ids, skip_special_tokens=skip)
    assert smol_tok.encode("<|im_start|>user")[0] == 1  # specials in text stay whole


def test_gguf_special_ids_match_transformers(smol_tok, hf_smollm_tokenizer):
    hf = hf_smollm_tokenizer
    assert (smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id,
    ) == (1, 2, 2)
    assert smol_tok.vocab_size == len(hf) == 49152
    # Every token the GGUF marks as control is special (skipped by skip_special_tokens), as in HF's added tokens.
    hf_special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(smol_tok.all_special_ids) == hf_special and len(hf_special) == 17


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about lobsters 🦞."},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smol_tok, hf_smollm_tokenizer, conversation, add_generation_prompt):
    ours = smol_tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref = hf_smollm_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert smol_tok.apply_chat_template(conversation, add_generation_prompt, tokenize=True) == hf_smollm_tokenizer(
        ref, add_special_tokens=False
    ).input_ids


def test_chat_template_default_system_message(smol_tok):
    text = smol_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_wordpiece_ids_match_transformers(mini_tok, hf_minilm_tokenizer, wikitext_lines, add_special_tokens):
    for text in wikitext_lines[:300] + HARD_STRINGS:
        assert mini_tok.encode(text, add_special_tokens) == hf_minilm_tokenizer(
            text, add_special_tokens=add_special_tokens
        ).input_ids, repr(text)


def test_wordpiece_ignores_the_files_fixed_padding(mini_tok, hf_minilm_tokenizer):
    """tokenizer.json of MiniLM pads and truncates to 128; encode must do neither."""
    long_text = "word " * 300
    assert len(mini_tok.encode(long_text)) == len(hf_minilm_tokenizer(long_text).input_ids) == 302
    assert mini_tok.encode("hi") == [101, 7632, 102]
    assert mini_tok.pad_token_id == hf_minilm_tokenizer.pad_token_id == 0


def test_incremental_detokenizer_never_splits_a_character(smol_tok):
    text = "".join(HARD_STRINGS) + " 🦞🦞 中文 end"
    ids = smol_tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tok, skip_special_tokens=False)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == smol_tok.decode(ids) == text
    assert sum(1 for p in pieces if p == "") > 0  # multi-byte emoji were held back at least once


def test_incremental_detokenizer_after_a_prompt(smol_tok):
    prompt = smol_tok.encode("The lobster said")
    answer = smol_tok.encode(" hello, wörld", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tok, prompt_ids=prompt)
    assert "".join(detok.add(i) for i in answer) + detok.flush() == " hello, wörld"


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelSourceError) as err:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)


def test_no_chat_template_is_a_clear_error(mini_tok):
    with pytest.raises(LmkError, match="no chat template"):
        mini_tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ("hi", "list"),
        ([{"role": "user"}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": "a"}, ["not", "a", "dict"]], r"messages\[1\]"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\.role"),
    ],
)
def test_bad_messages_name_the_field(smol_tok, messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        smol_tok.apply_chat_template(messages)


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(LmkError, match=r"x\.gguf.*'bert'.*gpt2"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
