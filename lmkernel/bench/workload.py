"""The requests a benchmark sends: WikiText prompts and output lengths drawn with a fixed seed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer

DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


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


def wikitext_workload(
    tokenizer: Tokenizer,
    num_requests: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int = 0,
    text_file: Path = DEFAULT_TEXT,
) -> Workload:
    """`num_requests` prompts cut from random places of a text file, lengths uniform in the ranges."""
    if not text_file.is_file():
        raise LmkError(f"{text_file}: benchmark text not found; pass --data with a plain-text file")
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8"), add_special_tokens=False)
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_requests):
        n = rng.randint(*prompt_range)
        if n >= len(ids):
            raise LmkError(f"{text_file}: {len(ids)} tokens, too short for prompts of {n}")
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start : start + n])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)
