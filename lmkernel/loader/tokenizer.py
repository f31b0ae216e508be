"""One `Tokenizer` over the `tokenizers` library, built from tokenizer.json or from a GGUF vocabulary.

It gives the same ids as the Hugging Face tokenizer of the same files, renders the model's chat
template with jinja2 the way transformers does, and detokenizes incrementally for streaming.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmkernel.errors import LmkError, ModelSourceError, UnsupportedModelError
from lmkernel.loader.hf_dir import read_json

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
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class ChatTemplateError(LmkError):
    """A model without a chat template, or a template that fails to render."""


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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _add_missing_specials(backend: Backend, tokens: Sequence[str | None]) -> None:
    """Add each token not yet an added token as a special one, as transformers' constructor does."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(tokens) if t is not None and t not in known]
    backend.add_tokens([AddedToken(t, special=True) for t in missing])


class Tokenizer:
    """Text to ids and back, special token ids, and the chat template of one model."""

    def __init__(
        self, backend: Backend, special_tokens: Mapping[str, str | None], chat_template: str | None, source: str,
        clean_up_spaces: bool = False,
    ) -> None:
        backend.no_truncation()  # transformers' __call__ neither pads nor truncates unless asked
        backend.no_padding()
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        # transformers' cleanup of " ." and " 's" on decode; it never applies it to BPE models.
        self.clean_up_spaces = clean_up_spaces and not isinstance(backend.model, models.BPE)
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.unk_token_id = self._id_of("unk_token")
        # Every id `decode(..., skip_special_tokens=True)` drops, named specials included.
        self.all_special_ids = sorted(
            {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            | {i for i in (self._id_of(k) for k in self.special_tokens) if i is not None}
        )

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        """From a Hugging Face directory: tokenizer.json, plus tokenizer_config.json for specials and the template;
        files that do not make a tokenizer are a ModelSourceError naming the directory."""
        return _checked(lambda: cls._from_hf_dir(directory), str(directory), "tokenizer files")

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`), built as transformers builds it from the same file."""
        return _checked(lambda: cls._from_gguf(metadata, source), source, "GGUF tokenizer metadata")

    @classmethod
    def _from_hf_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelSourceError(f"{directory}: no tokenizer.json; expected the model's tokenizers-format tokenizer file")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise ModelSourceError(f"{path}: cannot read tokenizer ({exc})") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                config.update(read_json(directory / name))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").is_file():  # the separate file wins, as in transformers
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {name: _token_text(config.get(name)) for name in _NAMED}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        _add_missing_specials(backend, [*specials.values(), *(_token_text(t) for t in extra)])
        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        return cls(backend, specials, template, str(directory), clean_up)

    @classmethod
    def _from_gguf(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
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
            return _wordpiece(tokens, types, metadata, source)
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
        _add_missing_specials(backend, list(specials.values()))
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(backend, specials["bos_token"], specials["eos_token"], add_bos, add_eos)
        return cls(backend, specials, metadata.get("tokenizer.chat_template"), source)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as transformers' `decode` gives it."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        for before, after in _CLEANUPS if self.clean_up_spaces else ():
            text = text.replace(before, after)
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, or None."""
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str | list[int]:
        """Render a conversation with the model's own template; `tokenize=True` returns its ids. `tools`:
        function definitions in OpenAI's form, for templates that render them."""
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source}: this model has no chat template; pass a plain prompt instead")
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(f"messages[{i}].{key} must be a string")
        try:
            text = _compile(self.chat_template).render(
                messages=[dict(m) for m in messages], tools=list(tools) if tools else None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template is outside code: anything it raises is its failure
            raise ChatTemplateError(f"{self.source}: chat template failed to render: {type(exc).__name__}: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _checked(build: Callable[[], Tokenizer], source: str, what: str) -> Tokenizer:
    """`build()`, with anything but our own errors (the Rust side raises bare Exceptions, odd values TypeErrors)
    turned into a ModelSourceError naming the source: tokenizer files come from outside."""
    try:
        return build()
    except LmkError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ModelSourceError(f"{source}: the {what} do not make a tokenizer ({type(exc).__name__}: {exc})") from None


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


def _wordpiece(tokens: list[str], types: list[int], metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """BERT's WordPiece from a GGUF vocabulary. llama.cpp writes word-initial pieces with a leading "▁" and
    continuations bare ("##" dropped), bracketed specials as they are; this spells them back. Text is
    lowercased and split on spaces and punctuation (BERT's normalizer and pre-tokenizer, as llama.cpp does),
    and [CLS] ... [SEP] surround each sequence."""
    def spelled(token: str) -> str:
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
    return Tokenizer(backend, specials, metadata.get("tokenizer.chat_template"), source, clean_up_spaces=True)


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


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """jinja2's sandbox, and no power or repetition that builds a value no chat prompt needs (a hostile
    template's `'x' * 10**10` would take the process's memory)."""

    intercepted_binops = frozenset(["*", "**"])
    MAX_ITEMS = 1 << 20

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError(f"chat template raises to the power {right}")
        if operator == "*":
            sized, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(times, int) and len(sized) * times > self.MAX_ITEMS:
                raise SecurityError(f"chat template repeats a value {times} times")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """A template compiled in a sandbox with the options and helpers Hugging Face templates expect."""
    env = _TemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson  # jinja2's own escapes HTML characters; templates expect plain JSON
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


class IncrementalDetokenizer:
    """Turns a growing list of ids into text pieces for streaming, never splitting a UTF-8 character.

    Each step decodes only a short window from the last emitted boundary (vLLM's prefix/read offsets).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        # A few prompt ids give the first generated token its left context (a leading space, say).
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def _window(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        return decode(self.ids[self.prefix_offset : self.read_offset], skip), decode(self.ids[self.prefix_offset :], skip)

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append ids and return the newly completed text (possibly empty)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix, full = self._window()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or a character still missing bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (a dangling partial character, as U+FFFD)."""
        prefix, full = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
