"""The `lmk` command: one typed function per subcommand, one module per command group.

This module holds the app and what the groups share (the error line, the option types); importing a
group's module registers its commands. Heavy modules (torch, the engine, the server) are imported
only inside the commands, so `lmk --help` answers without them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lmkernel.errors import LmkError

app = typer.Typer(help="lmkernel: run, compress, fine-tune and serve transformer language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(exc: Exception) -> typer.Exit:
    """Print an lmkernel error as one line on stderr and give the exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


Model = Annotated[str, typer.Argument(help="alias, Hugging Face directory or .gguf file")]
Opt = typer.Option

# The engine settings commands take one at a time, as declared in EngineConfig (lmkernel/cli/options.py).
from lmkernel.cli.options import option  # noqa: E402
from lmkernel.config import EngineConfig  # noqa: E402

Dtype = option(EngineConfig, "dtype")
Device = option(EngineConfig, "device")
Quantization = option(EngineConfig, "quantization")
KVMemory = option(EngineConfig, "kv_cache_memory")
MaxNumSeqs = option(EngineConfig, "max_num_seqs")
MaxNumBatchedTokens = option(EngineConfig, "max_num_batched_tokens")
CpuPath = option(EngineConfig, "cpu_path")


def quantization_arg(value: str) -> str | None:
    """The `--quantization` choice as `load_model` takes it (None: dequantize)."""
    if value not in ("auto", "keep", "dequantize"):
        raise LmkError(f"--quantization must be auto, keep or dequantize; got '{value}'")
    return None if value == "dequantize" else value


def main() -> None:
    app()


# Each module registers its commands on `app` (or its own sub-app) when imported; this order is the
# order `lmk --help` lists them in.
from lmkernel.cli import models, generate, bench, compress, eval, serve, batch, monitor, recommend, train  # noqa: E402,F401,I001
