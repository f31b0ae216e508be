"""The tokenizer against Hugging Face's on the same files: ids, decoding, chat templates, streaming."""

from __future__ import annotations

import copy
import json
import shutil
import unicodedata
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_gguf import byte_symbols

from lmkernel.errors import LmkError, ModelSourceError, UnsupportedModelError
from lmkernel.loader.gguf_file import open_reader, read_metadata
from lmkernel.loader.tokenizer import IncrementalDetokenizer, Tokenizer

HARD_STRINGS = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷🇯🇵 and 🤖!",
    "中文字符测试，日本語のテキスト。한국어 문장",
    "مرحبا بالعالم",
    unicodedata.normalize("NFD", "café naïve résumé Ångström"),
    "e\u0301\u0300\u0302 stacked combining accents",
    "tabs\t\tand\nnew\n\n\nlines\r\nwindows\r\n",
    " " * 64 + "after a long run of spaces",
    "\t \n \t\t\n    \n",
    "digits 1234567890123 and 3.14159 and 0000007",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|> spaced specials <|im_end|>\n",
    "don't I'll we've ME'LL",
    "\u200b zero width and \u00a0 no-break space",
]
STREAM_TEXT = "".join(HARD_STRINGS) + " 🦞🦞 中文 end 👨‍👩‍👧"


@pytest.fixture(scope="module")
def smol_tok(smollm_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_metadata(open_reader(smollm_gguf)), str(smollm_gguf))


@pytest.fixture(scope="module")
def mini_tok(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(minilm_dir)


def _hf_ids(hf, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [hf(text, add_special_tokens=add_special_tokens).input_ids for text in texts]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gguf_ids_match_transformers(smol_tok, hf_smollm_tokenizer, wikitext_lines, add_special_tokens):
    texts = wikitext_lines[:300] + HARD_STRINGS
    expected = _hf_ids(hf_smollm_tokenizer, texts, add_special_tokens)
    for text, ids in zip(texts, expected):
        assert smol_tok.encode(text, add_special_tokens) == ids, repr(text)
    assert smol_tok.encode_batch(texts, add_special_tokens) == expected


def test_gguf_backend_is_the_one_transformers_builds(smol_tok, hf_smollm_tokenizer):
    """Same model, merges, normalizer, pre-tokenizer, post-processor, decoder and added tokens."""
    assert json.loads(smol_tok.backend.to_str()) == json.loads(hf_smollm_tokenizer.backend_tokenizer.to_str())


def test_gguf_round_trip_and_decode_match(smol_tok, hf_smollm_tokenizer, wikitext_lines):
    for text in wikitext_lines[:50] + HARD_STRINGS:
        ids = smol_tok.encode(text)
        assert smol_tok.decode(ids) == text
        for skip in (False, True):
            assert smol_tok.decode(ids, skip) == hf_smollm_tokenizer.decode(ids, skip_special_tokens=skip), repr(text)
    assert smol_tok.encode("<|im_start|>user") == [1, 4093]  # specials in text stay whole
    assert smol_tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_gguf_special_ids_match_transformers(smol_tok, hf_smollm_tokenizer):
    hf = hf_smollm_tokenizer
    ours = (smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.pad_token_id, smol_tok.unk_token_id)
    assert ours == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 2, 0)
    assert smol_tok.vocab_size == len(hf) == 49152
    assert smol_tok.encode("hi")[0] != 1  # SmolLM2's GGUF says add_bos_token = false
    assert smol_tok.id_to_token(2) == "<|im_end|>" and smol_tok.token_to_id("<|im_start|>") == 1
    # all_special_ids: every id skip_special_tokens drops (the 17 control tokens), a superset of HF's named ones.
    hf_special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(smol_tok.all_special_ids) == hf_special and len(hf_special) == 17
    assert set(hf.all_special_ids) <= set(smol_tok.all_special_ids)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about lobsters 🦞.\n\nKeep it short."},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smol_tok, hf_smollm_tokenizer, conversation, add_generation_prompt):
    hf = hf_smollm_tokenizer
    ours = smol_tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    ids = smol_tok.apply_chat_template(conversation, add_generation_prompt, tokenize=True)
    assert ids == hf(ref, add_special_tokens=False).input_ids
    assert ids.count(1) == len(conversation) + (conversation[0]["role"] != "system") + add_generation_prompt


def test_chat_template_default_system_message(smol_tok):
    text = smol_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_wordpiece_ids_match_transformers(mini_tok, hf_minilm_tokenizer, wikitext_lines, add_special_tokens):
    texts = wikitext_lines[:300] + HARD_STRINGS
    for text, ids in zip(texts, _hf_ids(hf_minilm_tokenizer, texts, add_special_tokens)):
        assert mini_tok.encode(text, add_special_tokens) == ids, repr(text)
        for skip in (False, True):
            assert mini_tok.decode(ids, skip) == hf_minilm_tokenizer.decode(ids, skip_special_tokens=skip), repr(text)


def test_wordpiece_specials_and_no_fixed_padding(mini_tok, hf_minilm_tokenizer):
    """tokenizer.json of MiniLM pads and truncates to 128; encode must do neither."""
    hf = hf_minilm_tokenizer
    long_text = "word " * 300
    assert len(mini_tok.encode(long_text)) == len(hf(long_text).input_ids) == 302
    assert mini_tok.encode("Hi") == [101, 7632, 102]
    assert (mini_tok.pad_token_id, mini_tok.unk_token_id, mini_tok.bos_token_id) == (hf.pad_token_id, hf.unk_token_id, None)
    assert sorted(mini_tok.all_special_ids) == sorted(hf.all_special_ids) == [0, 100, 101, 102, 103]
    assert mini_tok.vocab_size == len(hf) == 30522 and mini_tok.chat_template is None


# Tiny GGUF vocabularies, written as llama.cpp writes them, so the SentencePiece path and the
# post-processor / split / appended-special rules are checked against transformers in milliseconds.
SPM_PIECES = ["▁", "▁t", "he", "▁the", "in", "▁a", "▁in", "▁▁", "▁▁▁▁", "中", *"abcdefghijklmnopqrstuvwxyz.,!?'"]


def _write_gguf(path: Path, model: str, tokens: list[str], types: list[int], **extra) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(context_length=64, embedding_length=8, block_count=1, feed_forward_length=16,
                           head_count=2, head_count_kv=2, layer_norm_rms_eps=1e-5, rope_dimension_count=4).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny_tokenizers")
    spm = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES, "<think>"]
    bpe = ["<s>", "</s>", *byte_symbols(), "Ġt", "he", "Ġa", "in", "Ġthe", "<think>"]
    return {
        # SentencePiece: no merges (recovered from scores), BOS by default, byte fallback.
        "spm": _write_gguf(d / "spm.gguf", "llama", spm, [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES), 4],
                           token_scores=[0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0],
                           bos_token_id=1, eos_token_id=2, unk_token_id=0),  # fmt: skip
        # Byte-level without <|endoftext|> (transformers appends it), Llama-3 split, BOS and EOS added.
        "bpe": _write_gguf(d / "bpe.gguf", "gpt2", bpe, [3, 1, *[1] * (len(bpe) - 3), 4],
                           token_merges=["Ġ t", "h e", "Ġ a", "i n", "Ġt he"], tokenizer_pre="llama-bpe",
                           bos_token_id=0, eos_token_id=1, add_bos_token=True, add_eos_token=True),  # fmt: skip
    }


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_tiny_gguf_vocabularies_match_transformers(tiny_ggufs, kind):
    """Byte-level BPE: the very tokenizer transformers builds. SentencePiece: the same ids wherever
    transformers' GGUF converter keeps SentencePiece's rule; it drops the space SentencePiece (and
    llama.cpp, and Llama-2's own tokenizer.json) puts before a text that starts with one, so those
    texts are held to llama.cpp's ids instead (test_gguf_vocabularies_match_llama_cpp)."""
    from transformers import AutoTokenizer

    path = tiny_ggufs[kind]
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_gguf(read_metadata(open_reader(path)), str(path))
    if kind == "bpe":
        assert json.loads(ours.backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.vocab_size) == (
        hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf),
    )  # fmt: skip
    texts = [*HARD_STRINGS, "the cat in a hat", " the", "<s>the</s><think>x", "中中 the"]
    for add_special_tokens in (True, False):
        for text, ids in zip(texts, _hf_ids(hf, texts, add_special_tokens)):
            if kind == "bpe" or not (text[:1].isspace() or "<s>" in text):
                assert ours.encode(text, add_special_tokens) == ids, repr(text)
            for skip in (False, True):
                assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), repr(text)
    if kind == "spm":
        detok = IncrementalDetokenizer(ours, skip_special_tokens=False)
        ids = ours.encode(STREAM_TEXT, add_special_tokens=False)
        pieces = [detok.add(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + detok.flush() == ours.decode(ids) == STREAM_TEXT  # SentencePiece keeps leading spaces




def test_incremental_detokenizer_never_splits_a_character(smol_tok):
    ids = smol_tok.encode(STREAM_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tok, skip_special_tokens=False)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == smol_tok.decode(ids) == STREAM_TEXT
    assert pieces.count("") > 5  # multi-byte characters were held back
    assert len(detok.ids) - detok.prefix_offset < 16  # the decoded window stays short


def test_incremental_detokenizer_after_a_prompt_and_skipping_specials(smol_tok):
    prompt = smol_tok.encode("The lobster said")
    answer = smol_tok.encode(" hello, wörld 🦞<|im_end|>", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tok, prompt_ids=prompt)
    assert "".join(detok.add(i) for i in answer) + detok.flush() == " hello, wörld 🦞"
    detok = IncrementalDetokenizer(smol_tok, prompt_ids=prompt, skip_special_tokens=False)
    assert detok.add(answer[:3]) + detok.add(answer[3:]) == " hello, wörld 🦞<|im_end|>"


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelSourceError) as err:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)


BLOCK_TEMPLATE = """{% for m in messages %}
    {% if m.role == 'skip' %}
        {% continue %}
    {% elif m.role == 'bad' %}
        {{ raise_exception('no bad roles') }}
    {% endif %}
[{{ m.role }}] {{ m.content | tojson }} {{ cls_token }}
{% endfor %}
{% if add_generation_prompt %}
    [assistant]
{% endif %}"""


def test_chat_template_file_beside_tokenizer_json(tmp_path, minilm_dir):
    from transformers.utils.chat_template_utils import render_jinja_template

    shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "unused", "cls_token": "[CLS]"}))
    (tmp_path / "chat_template.jinja").write_text(BLOCK_TEMPLATE)
    tok = Tokenizer.from_hf_dir(tmp_path)
    messages = [{"role": "user", "content": 'é"x'}, {"role": "skip", "content": "-"}, {"role": "system", "content": "y"}]
    text = tok.apply_chat_template(messages)
    assert text == '[user] "é\\"x" [CLS]\n[system] "y" [CLS]\n    [assistant]\n'
    rendered, _ = render_jinja_template([messages], chat_template=BLOCK_TEMPLATE, add_generation_prompt=True, cls_token="[CLS]")
    assert text == rendered[0]
    with pytest.raises(LmkError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


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


@pytest.mark.parametrize(
    ("metadata", "pattern"),
    [
        ({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, r"x\.gguf.*'rwkv'"),
        ({"tokenizer.ggml.model": "llama", "general.architecture": "phi3"}, r"x\.gguf.*'llama'.*'phi3'"),
    ],
)
def test_unsupported_gguf_tokenizer_model(metadata, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        Tokenizer.from_gguf(metadata, "x.gguf")


# llama.cpp's own tokenizer tests (vocabulary-only GGUF files with inputs and the ids llama.cpp gives),
# for the vocabularies of the models lmkernel loads. Llama-3's BPE differs on one string: llama.cpp's
# Unicode tables split "Việt" (with a combining mark) where Rust's regex, and transformers, do not.
LLAMA_CPP_EXCEPTIONS = {"llama-bpe": {"Cửa Việt"}}


@pytest.mark.parametrize("vocab", ["llama-spm", "bert-bge", "qwen2", "gpt-2", "llama-bpe"])
def test_gguf_vocabularies_match_llama_cpp(llama_cpp_vocabs, vocab):
    path = llama_cpp_vocabs / f"ggml-vocab-{vocab}.gguf"
    ours = Tokenizer.from_gguf(read_metadata(open_reader(path)), str(path))
    inputs = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    expected = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) >= 40 and len(expected) >= len(inputs)
    checked = 0
    for text, line in zip(inputs, expected):
        if text in LLAMA_CPP_EXCEPTIONS.get(vocab, ()):
            continue
        assert ours.encode(text, add_special_tokens=False) == [int(t) for t in line.split()], repr(text)
        checked += 1
    assert checked >= len(inputs) - 1


def test_sentencepiece_spaces_bytes_and_specials(llama_cpp_vocabs):
    """Llama-2's vocabulary: the space SentencePiece puts before a text (also after a special token),
    runs of spaces, newlines and byte fallback, and a round trip through decode."""
    path = llama_cpp_vocabs / "ggml-vocab-llama-spm.gguf"
    tok = Tokenizer.from_gguf(read_metadata(open_reader(path)), str(path))
    assert tok.encode(" ", add_special_tokens=False) == [259]  # "▁▁"
    assert tok.encode("Hello") == [1, 15043]  # BOS, "▁Hello"
    assert tok.encode("</s>Hello", add_special_tokens=False) == [2, 15043]  # a prefix after a special token
    assert tok.encode("\n\n", add_special_tokens=False) == [29871, 13, 13]
    assert tok.encode("🦙", add_special_tokens=False) == [29871, 243, 162, 169, 156]  # four byte-fallback pieces
    for text in ["Hello world", "  two  spaces\n\ttab", "🦙.cpp and ünïcödé", "a\n\n\n   b"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


HOSTILE_TEMPLATES = [
    "{{ 1 / 0 }}", "{{ messages[0]['content'] + 1 }}", "{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}",
    "{{ 'x' * 10000000000 }}", "{{ [1] * 100000000 }}", "{{ 10 ** 100000000 }}", "{% for m in messages %}{{ m.nope.deeper }}",
    "{{ raise_exception('no') }}", "{{ tools | tojson(indent='x') }}", "{% set x = messages | map('int') | list %}{{ x }}",
    "{{ strftime_now(12) }}", "{{ range(10**9) | list | length }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ messages | attr('__dict__') }}", "{{ cycler.__init__.__globals__ }}", "{% include 'x' %}", "{{",
]
FRAGMENTS = ["{{ ", " }}", "{% ", " %}", "messages", "[0]", "['content']", "for m in messages", "endfor", "if ", "endif",
             " + ", " * ", "tools", " | tojson", "'a'", "1", "(", ")", "loop.index", "add_generation_prompt", "bos_token"]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_fail_cleanly(mini_tok, template):
    tok = copy.copy(mini_tok)
    tok.chat_template = template
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}])
    except LmkError as exc:
        assert "chat template" in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14))
def test_random_chat_templates_render_or_fail_cleanly(mini_tok, pieces):
    tok = copy.copy(mini_tok)
    tok.chat_template = "".join(pieces)
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except LmkError:
        pass
