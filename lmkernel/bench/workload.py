"""The requests a benchmark sends: prompts cut from a text and output lengths drawn with a fixed seed,
and where the benchmarks' texts are.

The default prompt text ships inside the package (`lmkernel/data/bench_text.txt`, prose written for
this project). The benchmarks that compare against published numbers read the repository's shared
data sets instead (`SHARED_DATA`, beside a checkout only); `shared_file` names the option to pass
when they are not there."""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def bench_text() -> str:
    """The prompt text shipped with the package."""
    return resources.files("lmkernel").joinpath("data", "bench_text.txt").read_text(encoding="utf-8")


def shared_file(relative: str, option: str, given: Path | None = None) -> Path:
    """`given`, or the repository's shared data file `relative` (e.g. "wikitext-2/valid.txt"); a clear
    error naming `option` when the file is not there (an installed package has no shared data)."""
    if given is not None:
        if not given.is_file():
            raise LmkError(f"{option} {given}: no such file")
        return given
    path = SHARED_DATA / relative
    if not path.is_file():
        raise LmkError(f"{path}: not found (the repository's shared data, present beside a checkout of lmkernel "
                       f"only); pass {option} with your copy of {relative}")
    return path


@dataclass(frozen=True)
class Workload:
    """Prompts as token ids, and how many tokens each must generate."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def text_workload(
    tokenizer: Tokenizer,
    num_requests: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int = 0,
    text_file: Path | None = None,
) -> Workload:
    """`num_requests` prompts cut from random places of a text (default: the packaged benchmark text),
    lengths uniform in the ranges."""
    if text_file is not None and not text_file.is_file():
        raise LmkError(f"{text_file}: benchmark text not found")
    name = str(text_file) if text_file is not None else "the benchmark text"
    text = text_file.read_text(encoding="utf-8") if text_file is not None else bench_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)  # nosec B311  # seeded order for data and benchmarks, not a secret
    prompts, outputs = [], []
    for _ in range(num_requests):
        n = rng.randint(*prompt_range)
        if n >= len(ids):
            raise LmkError(f"{name}: {len(ids)} tokens, too short for prompts of {n}")
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start : start + n])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)
