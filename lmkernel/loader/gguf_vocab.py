"""GGUF vocabularies (`tokenizer.ggml.*`) into `tokenizers` backends, built as transformers builds them from the
same file: byte-level BPE (GPT-2 style), SentencePiece BPE with byte fallback, and BERT's WordPiece."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmkernel.errors import ModelSourceError, UnsupportedModelError

# Split rules for the GGUF `tokenizer.ggml.pre` values whose merges were learned on them (transformers'
# table); any other value keeps the builder's own pre-tokenizer.
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe".split(), _LLAMA3),
    **dict.fromkeys("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez".split(), _QWEN2),
    **dict.fromkeys("gpt-4o llama4 kanana2 talkie minimax-m2".split(), _GPT4O),
    "tekken": _TEKKEN,
    "qwen35": _QWEN35,
}
_CONTROL, _USER_DEFINED = 3, 4
# transformers builds GGUF vocabularies through GPT2Tokenizer / LlamaTokenizer, whose default specials
# it adds (appending them when the vocabulary lacks them) before reading the file's own.
_BUILDER_DEFAULTS = {"gpt2": ("<|endoftext|>",), "llama": ("<s>", "</s>", "<unk>"), "bert": ()}
# Gemma's SentencePiece files: no space prefix, merges in the order the tokens are listed (GemmaTokenizer).
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_GEMMA_DEFAULTS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# SentencePiece files of these architectures need a builder transformers special-cases that we do not have.
_SPM_SPECIAL_ARCHS = ("phi3",)
_GGUF_SPECIALS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding",  # nosec B105  # a token or tensor name, not a password
                  "cls_token": "cls", "sep_token": "seperator", "mask_token": "mask"}  # nosec B105  # token names ("seperator": GGUF's spelling), not passwords


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def add_missing_specials(backend: Backend, tokens: Sequence[str | None]) -> None:
    """Add each token not yet an added token as a special one, as transformers' constructor does."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(tokens) if t is not None and t not in known]
    backend.add_tokens([AddedToken(t, special=True) for t in missing])


def gguf_vocabulary(metadata: Mapping[str, Any], source: str) -> tuple[Backend, dict[str, str | None], bool]:
    """The backend of a GGUF vocabulary, its named special tokens, and whether decoding cleans up spaces (WordPiece's
    does), built as transformers builds them from the same file."""
    kind = metadata.get("tokenizer.ggml.model")
    arch = metadata.get("general.architecture")
    if kind not in _BUILDER_DEFAULTS or (kind == "llama" and arch in _SPM_SPECIAL_ARCHS):
        raise UnsupportedModelError(
            f"{source}: GGUF tokenizer model '{kind}' (architecture '{arch}') is not supported; expected 'gpt2' "
            f"(byte-level BPE), 'llama' (SentencePiece BPE, not for {', '.join(_SPM_SPECIAL_ARCHS)}) or 'bert' (WordPiece)"
        )
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ModelSourceError(f"{source}: GGUF metadata has no 'tokenizer.ggml.tokens'")
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    if kind == "bert":
        return (*_wordpiece(tokens, types, metadata, source), True)
    gemma = kind == "llama" and arch in _GEMMA_ARCHS
    backend = _byte_level(tokens, metadata) if kind == "gpt2" else _sentencepiece(tokens, metadata, source, gemma)
    backend.add_tokens([AddedToken(t, special=True) for t in (_GEMMA_DEFAULTS if gemma else _BUILDER_DEFAULTS[kind])])
    spelled = set(_byte_alphabet().values()) if kind == "gpt2" else None
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and (spelled is None or set(t) <= spelled)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if (split := _PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))) is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    indices = {name: metadata.get(f"tokenizer.ggml.{key}_token_id") for name, key in _GGUF_SPECIALS.items()}
    specials = {name: tokens[i] if i is not None and 0 <= i < len(tokens) else None for name, i in indices.items()}
    add_missing_specials(backend, list(specials.values()))
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    _set_bos_eos(backend, specials["bos_token"], specials["eos_token"], add_bos, add_eos)
    return backend, specials, False


def _byte_level(tokens: list[str], metadata: Mapping[str, Any]) -> Backend:
    """Byte-level BPE (GPT-2 style), with tokens outside the byte alphabet respelled in bytes."""
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges") or []]
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], metadata: Mapping[str, Any], source: str, gemma: bool = False) -> Backend:
    """SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, TinyLlama, Gemma); merges recovered from
    scores if absent. As llama.cpp and transformers do it: every space becomes "▁" and the text gets one
    more in front (`tokenizer.ggml.add_space_prefix`, on unless the file says otherwise), so " Hello"
    is "▁" + "▁Hello" and a lone space is "▁▁"; nothing splits the text before the merges.

    Gemma's files differ (as transformers' GemmaTokenizer reads them): no space in front, runs of spaces
    stored as spaces (spelled "▁" here), and merges ranked by the order the tokens are listed, not by score."""
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    elif gemma:
        merges = _merges_from_scores(vocab, {t: -i for i, t in enumerate(tokens)})
    elif "tokenizer.ggml.scores" in metadata:
        merges = _merges_from_scores(vocab, dict(zip(tokens, metadata["tokenizer.ggml.scores"])))
    else:
        raise ModelSourceError(f"{source}: GGUF SentencePiece vocabulary has neither 'tokenizer.ggml.merges' nor scores")
    unknown = {"unk_token": "<unk>"} if gemma else {}  # nosec B105  # a token name, not a password
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, **unknown))
    prefix = not gemma and bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        [*([normalizers.Prepend("▁")] if prefix else []), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         *([decoders.Strip(content=" ", left=1)] if prefix else [])]
    )
    return backend


def _wordpiece(tokens: list[str], types: list[int], metadata: Mapping[str, Any],
               source: str) -> tuple[Backend, dict[str, str | None]]:
    """BERT's WordPiece, and its named special tokens, from a GGUF vocabulary. llama.cpp writes word-initial pieces with a leading "▁" and
    continuations bare ("##" dropped), bracketed specials as they are; this spells them back. Text is
    lowercased and split on spaces and punctuation (BERT's normalizer and pre-tokenizer, as llama.cpp does),
    and [CLS] ... [SEP] surround each sequence."""
    def spelled(token: str) -> str:
        """A token as BERT's vocabulary spells it ("##" on continuations)."""
        if token.startswith("[") and token.endswith("]"):
            return token
        return token[1:] if token.startswith("▁") else "##" + token

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(spelled(token), i)
    indices = {name: metadata.get(f"tokenizer.ggml.{key}_token_id") for name, key in _GGUF_SPECIALS.items()}
    specials = {name: tokens[i] if i is not None and 0 <= i < len(tokens) else None for name, i in indices.items()}
    if specials["unk_token"] is None:
        raise ModelSourceError(f"{source}: GGUF WordPiece vocabulary has no 'tokenizer.ggml.unknown_token_id'")
    backend = Backend(models.WordPiece(vocab=vocab, unk_token=specials["unk_token"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    control = [t for t, k in zip(tokens, types) if k == _CONTROL]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    # Files that name no [CLS] / [SEP] (nomic-bert's) mark them as BOS and EOS, as llama.cpp reads them.
    cls, sep = specials["cls_token"] or specials["bos_token"], specials["sep_token"] or specials["eos_token"]
    if cls is not None and sep is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return backend, specials


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two known tokens, best-scored token first (transformers' `generate_merges`)."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _set_bos_eos(backend: Backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """The post-processor transformers writes: optional BOS before and EOS after each sequence."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    specials = [(t, backend.token_to_id(t)) for t in used]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
