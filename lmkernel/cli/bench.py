"""`lmk bench ...`: lmkernel against a peer or the hardware limit, in one run.

This module holds the sub-app; importing a group's module registers its commands on it, and the order of
the imports below is the order `lmk bench --help` lists them in. What each command measures lives in
`lmkernel.bench`; the modules here read the options and print the tables."""

from __future__ import annotations

import typer

from lmkernel.cli import app

bench_app = typer.Typer(help="Benchmarks: lmkernel against a peer or the hardware limit, in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

from lmkernel.cli import bench_speed, bench_robustness, bench_engine, bench_serve, bench_apps  # noqa: E402,F401,I001
