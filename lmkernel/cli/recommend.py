"""`lmk recommend fit|eval|query`: items recommended from their text and from user behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmkernel.cli import Device, Opt, app, console, fail
from lmkernel.errors import LmkError

recommend_app = typer.Typer(help="Recommendations from item text and user behaviour.", no_args_is_help=True)
app.add_typer(recommend_app, name="recommend")


def _imports():
    try:
        from lmkernel.apps import recommend_store
        from lmkernel.apps.recommend_data import read_interactions, read_items
    except ImportError as exc:
        raise fail(LmkError(f"lmk recommend needs the recommend extra: pip install -e '.[recommend]' "
                            f"({exc.name} is missing)")) from None
    return recommend_store, read_interactions, read_items


@recommend_app.command("fit")
def fit(
    interactions: Annotated[Path, Opt(help="user, item, rating (optional), time: CSV, JSON lines or a RecBole .inter file")],
    items: Annotated[Path, Opt(help="item, text (or title), genres and year (optional): CSV, JSON lines or a RecBole .item file")],
    output: Annotated[Path, Opt("--output", "-o", help="the recommender directory to write")],
    encoder: Annotated[str, Opt(help="the sentence encoder to fine-tune on behaviour")] = "all-minilm-l6-v2",
    encoder_steps: Annotated[int, Opt(help="contrastive fine-tuning steps (0: the encoder as it is)")] = 300,
    encoder_batch_size: Annotated[int, Opt(help="item pairs per step (the rest of the batch are the negatives)")] = 64,
    encoder_lr: Annotated[float, Opt(help="the encoder's peak learning rate")] = 2e-4,
    candidates: Annotated[int, Opt(help="nearest unseen items taken from the index")] = 200,
    popular_candidates: Annotated[int, Opt(help="recently popular unseen items added to them")] = 50,
    history: Annotated[int, Opt(help="a user's last items that make up their vector")] = 20,
    seed: Annotated[int, Opt()] = 0,
    overwrite: Annotated[bool, Opt(help="replace an existing output directory")] = False,
    device: Device = "auto",
) -> None:
    """Fine-tune the encoder on behaviour, index the items, train the re-ranker; report valid and test metrics."""
    store, read_interactions, read_items = _imports()
    from lmkernel.apps.item_encoder import EncoderTraining
    from lmkernel.apps.recommender import RecommenderConfig

    try:
        catalogue = read_items(items)
        data = read_interactions(interactions, catalogue)
        config = RecommenderConfig(encoder, EncoderTraining(encoder_steps, encoder_batch_size, encoder_lr, seed=seed),
                                   history, candidates=candidates, popular_candidates=popular_candidates, seed=seed)
        if encoder_steps < 0 or encoder_batch_size < 2 or not encoder_lr > 0:
            raise LmkError("--encoder-steps must be >= 0, --encoder-batch-size >= 2 and --encoder-lr > 0")
        console.print(f"{len(data):,} interactions of {len(data.users):,} users over {len(catalogue.ids):,} items")
        result = store.fit(data, catalogue, output, config, overwrite, log=console.print,
                           device="cpu" if device == "auto" else device)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    _table({"valid": result.valid, "test": result.test}, f"{output}: leave-one-out by time, full ranking")


def _table(rows: dict[str, dict[str, float]], title: str) -> None:
    table = Table(title=title)
    for col in ("split", "users", "HR@10", "NDCG@10", "MRR@10"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, m in rows.items():
        table.add_row(name, str(m["users"]), f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}")
    console.print(table)


@recommend_app.command("eval")
def evaluate(directory: Annotated[Path, typer.Argument(help="a directory written by `lmk recommend fit`")]) -> None:
    """Recompute the validation and test metrics of a fitted recommender."""
    store, _, _ = _imports()
    try:
        rows = store.Recommender.load(directory).evaluate()
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    _table(rows, f"{directory}: leave-one-out by time, full ranking")


@recommend_app.command("query")
def query(
    directory: Annotated[Path, typer.Argument(help="a directory written by `lmk recommend fit`")],
    user: Annotated[str, Opt(help="the user's id as in the interactions")],
    k: Annotated[int, Opt("-k", help="how many items")] = 10,
    time: Annotated[float | None, Opt(help="recommend as of this time (default: after the latest interaction)")] = None,
    as_json: Annotated[bool, Opt("--json", help="one JSON object on stdout")] = False,
) -> None:
    """The top-k unseen items for a user."""
    store, _, _ = _imports()
    try:
        items = store.Recommender.load(directory).query(user, k, time)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps({"user": user, "items": items}))
        return
    table = Table(title=f"user {user}")
    for col in ("rank", "item", "title"):
        table.add_column(col)
    for row in items:
        table.add_row(str(row["rank"]), row["item"], row["title"])
    console.print(table)
