"""Structured output: a grammar per request (JSON schema, regex, choice, Lark), enforced as a mask of
the tokens it allows on that request's logits at every step.

llguidance does the grammar work: it compiles a grammar against the model's vocabulary once per
request, and computes the masks of all constrained requests of a step in one parallel call, so a
batch mixing constrained and free requests is never serialised by them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmkernel.errors import LmkError

if TYPE_CHECKING:
    from lmkernel.engine.scheduler import ScheduledChunk

# Bounds on one grammar's compilation and on each step's mask (llguidance's "fuel"): a pathological
# schema or regex fails with an error instead of holding the engine.
COMPILE_SECONDS = 10.0
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# JSON without free whitespace between tokens: a small model cannot stall in runs of spaces and newlines,
# and the text still parses the same.
_COMPACT = {"whitespace_flexible": False}


class StructuredOutputError(LmkError):
    """A schema, regex, choice list or grammar that cannot be enforced; `param` names the field."""

    def __init__(self, message: str, param: str = "structured_outputs") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match: exactly one of a JSON schema (`json`, a dict or its text), a
    regular expression (`regex`, Rust regex syntax), one of several strings (`choice`), a Lark grammar
    (`grammar`, llguidance's dialect), or any JSON object (`json_object`). vLLM's names and meaning."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                f"structured_outputs must set exactly one of {', '.join(_KINDS)}; got {', '.join(given) or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise StructuredOutputError("structured_outputs.json must be a JSON schema (an object)", "structured_outputs.json")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                            "structured_outputs.choice")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise StructuredOutputError(f"structured_outputs.{name} must be a non-empty string", f"structured_outputs.{name}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> StructuredOutputs:
        """From vLLM's request field `structured_outputs` ({"json": ...}, {"regex": ...}, ...)."""
        unknown = sorted(set(fields) - set(_KINDS))
        if unknown:
            raise StructuredOutputError(f"structured_outputs has unknown fields {', '.join(unknown)}; expected one of "
                                        f"{', '.join(_KINDS)}")
        return cls(**fields)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's form (not yet checked: `GrammarCompiler.check` does that)."""
        import llguidance

        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise StructuredOutputError(f"structured_outputs.json is not valid JSON: {exc}", "structured_outputs.json") from None
            if not isinstance(schema, dict):
                raise StructuredOutputError("structured_outputs.json must be a JSON schema (an object)", "structured_outputs.json")
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
            except ValueError as exc:
                raise StructuredOutputError(f"structured_outputs.json: {exc}", "structured_outputs.json") from None
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """The model's vocabulary as llguidance sees it, and the compiled matcher of each constrained request.

    Built once per engine (reading the vocabulary takes about a second); `check` compiles a grammar in a
    worker thread with a time limit, so a request is refused before it is queued, never during a step.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], threads: int = 2) -> None:
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.limits = llguidance.LLParserLimits(verbose_errors=False)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmk-grammar")

    def matcher(self, spec: StructuredOutputs, timeout: float = COMPILE_SECONDS) -> Any:
        """A fresh matcher for one request; StructuredOutputError when the grammar is invalid or slow."""
        grammar = spec.llguidance_grammar()
        param = f"structured_outputs.{spec.kind}"
        future = self._pool.submit(self._ll.LLMatcher, self.tokenizer, grammar, log_level=0, limits=self.limits)
        try:
            matcher = future.result(timeout=timeout)
        except FutureTimeout:
            raise StructuredOutputError(f"{param}: compiling it took longer than {timeout:g} s", param) from None
        if matcher.is_error():
            raise StructuredOutputError(f"{param}: {matcher.get_error()}", param)
        return matcher

    def fill_masks(self, matchers: Sequence[Any]) -> torch.Tensor:
        """The allowed-token bitmask [len(matchers), ceil(vocab / 32)] of each matcher, computed in parallel."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                                              len(matchers))
        return bitmask

    def masks_along(self, matcher: Any, tokens: Sequence[int]) -> torch.Tensor:
        """The bitmask [len(tokens) + 1, words] before each of `tokens` and after the last, walking the matcher
        along them and back (speculative proposals, which its grammar allows: see `validate_tokens`)."""
        rows = []
        for token in tokens:
            rows.append(self.fill_masks([matcher]))
            matcher.consume_token(token)
        rows.append(self.fill_masks([matcher]))
        matcher.rollback(len(tokens))
        return torch.cat(rows)

    def allowed_for(self, chunks: Sequence[ScheduledChunk]) -> dict[str, torch.Tensor]:
        """The next tokens each constrained request of a step may take (bool [V]; for a chunk that checks
        proposals, [proposals + 1, V]), the sampled ones all computed in one parallel call."""
        constrained = [c.request for c in chunks if c.samples and not c.draft and c.request.matcher is not None]
        checked = [c for c in chunks if c.draft and c.request.matcher is not None]
        allowed: dict[str, torch.Tensor] = {}
        if constrained:
            masks = allowed_tokens(self.fill_masks([r.matcher for r in constrained]), self.vocab_size)
            allowed = {r.request_id: masks[i] for i, r in enumerate(constrained)}
        for chunk in checked:
            allowed[chunk.request.request_id] = allowed_tokens(self.masks_along(chunk.request.matcher, chunk.draft),
                                                               self.vocab_size)
        return allowed


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bitmask's rows as bool [rows, vocab_size]: True where the token is allowed."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(bool))
