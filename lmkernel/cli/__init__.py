"""The `lmk` command: one typed function per subcommand, one module per command group.

This module holds the app and what the groups share (the error line, the option types); importing a
group's module registers its commands. Heavy modules (torch, the engine, the server) are imported
only inside the commands, so `lmk --help` answers without them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from lmkernel.errors import LmkError

app = typer.Typer(help="lmkernel: run, compress, fine-tune and serve transformer language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(exc: Exception) -> typer.Exit:
    """Print an lmkernel error as one line on stderr and give the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


Model = Annotated[str, typer.Argument(help="alias, Hugging Face directory or .gguf file")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")]
Quantization = Annotated[str, typer.Option(
    help="GGUF weights: auto (kept in their blocks on CPU, dequantized for CUDA), keep, or dequantize")]
KVMemory = Annotated[str, typer.Option("--kv-cache-memory", help="KV-cache budget, e.g. 512MiB or 2GiB")]
SpecModel = Annotated[str | None, typer.Option(help="speculative decoding: 'ngram' (prompt lookup) or a draft model "
                                                    "sharing the model's vocabulary (alias or path); off when unset")]
SpecTokens = Annotated[int, typer.Option(help="with --speculative-model: tokens proposed a step (3 suits CPU kernels: "
                                              "4 rows of a decode step cost ~1.6 rows' time)")]

Deterministic = Annotated[bool, typer.Option("--deterministic", help="batch-invariant arithmetic: a request's tokens and "
                                             "log-probs do not depend on its batch, prompt chunking or the prefix cache "
                                             "(prompts ~4x slower: BENCHMARKS.md)")]


def speculative(model: str | None, num_tokens: int) -> dict[str, object] | None:
    """`EngineConfig.speculative` from the two speculative flags."""
    return None if model is None else {"model": model, "num_speculative_tokens": num_tokens}
Opt = typer.Option


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
