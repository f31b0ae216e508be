"""How a config field declares itself: its help, and its command-line type and flag (the CLI's options are
made from these, `lmkernel/cli/options.py`)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

_NO_CLI = object()


def setting(default: Any, help: str, cli: Any = _NO_CLI, flag: str | None = None) -> Any:
    """A config field with its one-line help, which the CLI's options are made from (`lmkernel/cli/options.py`);
    `cli`: the type the command line gives when it is not the field's own (None: no option of its own);
    `flag`: its option when not --the-field-name."""
    metadata: dict[str, Any] = {"help": help}
    if cli is not _NO_CLI:
        metadata["cli"] = cli
    if flag is not None:
        metadata["flag"] = flag
    return field(default=default, metadata=metadata)


def flag_of(config: Any, name: str) -> str:
    """The command-line flag of a config field: its own (`setting(..., flag=)`) or --the-field-name."""
    meta = next((f.metadata for f in dataclasses.fields(config) if f.name == name), None)
    if meta is None:
        owner = config if isinstance(config, type) else type(config)
        raise ValueError(f"{owner.__name__} has no setting '{name}'")
    return meta.get("flag", "--" + name.replace("_", "-"))
