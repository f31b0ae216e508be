"""One `Tokenizer` over the `tokenizers` library, built from tokenizer.json or from a GGUF vocabulary.

It gives the same ids as the Hugging Face tokenizer of the same files, renders the model's chat
template with jinja2 the way transformers does, and detokenizes incrementally for streaming.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmkernel.errors import LmkError, ModelSourceError, UnsupportedModelError

# Split rules for the GGUF `tokenizer.ggml.pre` values whose merges were learned on them; any other
# byte-level vocabulary uses GPT-2's rule, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4


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
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text to ids and back, special token ids, and the chat template of one model."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None,
        source: str,
    ) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.unk_token_id = self._id_of("unk_token")
        self.all_special_ids = sorted(
            {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            | {i for i in (self._id_of(k) for k in self.special_tokens) if i is not None}
        )

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        """From a Hugging Face directory: tokenizer.json, plus tokenizer_config.json for specials and the template."""
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
                try:
                    config.update(json.loads((directory / name).read_text(encoding="utf-8")))
                except json.JSONDecodeError as exc:
                    raise ModelSourceError(f"{directory / name}: not valid JSON ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        names = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
        specials = {name: _token_text(config.get(name)) for name in names}
        return cls(backend, specials, template, str(directory))

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`), built as transformers builds it from the same file."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"{source}: GGUF tokenizer model '{kind}' is not supported; expected 'gpt2' (byte-level BPE)"
            )
        tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ModelSourceError(f"{source}: GGUF metadata has no 'tokenizer.ggml.tokens'")
        types = list(metadata.get("tokenizer.ggml.token_type") or [])
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # Tokens outside the byte alphabet are stored as plain text; spell them in bytes like the rest.
        vocab = {
            t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        split = _PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        backend.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= spelled]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        specials = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "pad_token": token("padding_token_id"),
            "unk_token": token("unknown_token_id"),
        }
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and specials["bos_token"] is not None
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and specials["eos_token"] is not None
        if add_bos or add_eos:
            bos, eos = specials["bos_token"], specials["eos_token"]
            single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
            pair = single + (["$B:1"] if not add_eos else ["$B:1", f"{eos}:1"])
            used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in dict.fromkeys(used)]
            )
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
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """Render a conversation with the model's own template; `tokenize=True` returns its ids."""
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
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.source}: chat template failed to render: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """A template compiled in a sandbox with the options and helpers Hugging Face templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


class IncrementalDetokenizer:
    """Turns a growing list of ids into text pieces for streaming, never splitting a UTF-8 character.

    Each step decodes only a short window (from the last emitted boundary), so a token costs O(1)
    however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        # A few prompt ids give the first generated token its left context (a leading space, say).
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append ids and return the newly completed text (possibly empty)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (a dangling partial character, as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
