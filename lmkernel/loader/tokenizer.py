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
from tokenizers import models
from tokenizers import Tokenizer as Backend

from lmkernel.errors import LmkError, ModelSourceError
from lmkernel.loader.gguf_vocab import add_missing_specials, gguf_vocabulary
from lmkernel.loader.hf_dir import read_json

_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class ChatTemplateError(LmkError):
    """A model without a chat template, or a template that fails to render."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


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
        add_missing_specials(backend, [*specials.values(), *(_token_text(t) for t in extra)])
        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        return cls(backend, specials, template, str(directory), clean_up)

    @classmethod
    def _from_gguf(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """The tokenizer of a GGUF file's vocabulary (see `gguf_vocabulary`)."""
        backend, specials, clean_up = gguf_vocabulary(metadata, source)
        return cls(backend, specials, metadata.get("tokenizer.chat_template"), source, clean_up)

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
