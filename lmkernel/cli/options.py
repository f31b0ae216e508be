"""Command-line options made from the config dataclasses: each setting is declared once, with its help, in
`lmkernel/config/`, and `serve`, `batch`, `generate`, `chat` and `bench` take it from there.

`config_options(EngineConfig, "engine")` gives a command every engine setting as an option and hands it
the one `EngineConfig` they make; `option(EngineConfig, "dtype")` is one setting as a typer type."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from lmkernel.cli import fail
from lmkernel.config import EngineConfig, SpeculativeConfig
from lmkernel.errors import LmkError

F = TypeVar("F", bound=Callable[..., Any])

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": str | None,
          "int | None": int | None, "float | None": float | None}


@dataclass(frozen=True)
class _Option:
    """One command-line option: its parameter name, type, default, help and flag (None: --the-name)."""

    name: str
    kind: Any
    default: Any
    help: str
    flag: str | None = None

    @classmethod
    def of(cls, f: dataclasses.Field) -> _Option:
        kind = f.metadata.get("cli", f.type)
        return cls(f.name, _TYPES.get(kind, kind) if isinstance(kind, str) else kind, f.default, f.metadata["help"],
                   f.metadata.get("flag"))

    def annotated(self, default: Any) -> Any:
        """The Annotated typer type; a bool that defaults to False is an on-switch (as --deterministic)."""
        flags = [self.flag] if self.flag else []
        if self.kind is bool and not flags and default is False:
            flags = ["--" + self.name.replace("_", "-")]
        return Annotated[self.kind, typer.Option(*flags, help=self.help)]


# The speculative flags stand for `EngineConfig.speculative` (a SpeculativeConfig) on the command line.
_SPECULATIVE = [
    _Option("speculative_model", str | None, None, "speculative decoding: 'ngram' (prompt lookup) or a draft model "
            "sharing the model's vocabulary (alias or path); off when unset"),
    _Option("num_speculative_tokens", int, SpeculativeConfig.num_speculative_tokens, "with --speculative-model: "
            "tokens proposed a step (3 suits CPU kernels: 4 rows of a decode step cost ~1.6 rows' time)"),
]


def option(cls: type, name: str) -> Any:
    """One setting of a config dataclass (or a speculative flag) as an Annotated typer type; the command gives
    its default."""
    found = [o for o in _SPECULATIVE if o.name == name] or [_Option.of(f) for f in dataclasses.fields(cls) if f.name == name]
    if not found:
        raise ValueError(f"{cls.__name__} has no setting '{name}'")
    return found[0].annotated(found[0].default)


def _options(cls: type, skip: Collection[str]) -> list[_Option]:
    """The settings of `cls` that are options: fields with help and a command-line type, and for an engine the
    speculative flags."""
    found = [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in skip]
    options = [_Option.of(f) for f in found if f.metadata.get("cli", True) is not None]
    return options + (_SPECULATIVE if cls is EngineConfig and "speculative" not in skip else [])


def config_options(cls: type, param: str, skip: Collection[str] = (), defaults: Mapping[str, Any] | None = None,
                   build: Callable[[dict[str, Any]], Any] | None = None) -> Callable[[F], F]:
    """Give the command every setting of `cls` (but `skip`) as an option, with `defaults` for this command, and
    call it with the one `cls` they make as its `param` argument; a bad value is the command's error line.
    `build`: how the values make the config when not `cls(**values)`."""
    defaults = dict(defaults or {})
    options = _options(cls, skip)

    def wrap(command: F) -> F:
        own = inspect.signature(command, eval_str=True)
        added = []
        for o in options:
            default = defaults.get(o.name, o.default)
            added.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=o.annotated(default)))
        names = [p.name for p in added]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            try:
                config = build(values) if build is not None else _make(cls, values)
            except (LmkError, ValueError) as exc:
                raise fail(exc) from None
            return command(*args, **kwargs, **{param: config})

        kept = [p for p in own.parameters.values() if p.name != param]
        run.__signature__ = own.replace(parameters=kept + added)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in kept + added}
        return run  # type: ignore[return-value]

    return wrap


def _make(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from the option values; the two speculative flags become EngineConfig.speculative."""
    model = values.pop("speculative_model", None)
    tokens = values.pop("num_speculative_tokens", None)
    if model is not None:
        values["speculative"] = {"model": model, "num_speculative_tokens": tokens}
    return cls(**values)
