"""The crash-consistency harness in short (`lmk bench crash` runs 20 kill points a command): `lmk batch`,
`lmk train` and `lmk quantize` killed twice at seeded moments, then rerun, must end as uninterrupted runs do."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.bench import crash

pytestmark = pytest.mark.slow  # child processes for a minute or two: make test runs it, make test-fast does not

PHRASEBANK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "financial-phrasebank"


@pytest.fixture(scope="module")
def phrasebank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    for name, count in (("train", 32), ("valid", 16)):
        (d / f"{name}.jsonl").write_text("".join((PHRASEBANK / f"{name}.jsonl").read_text().splitlines(keepends=True)[:count]))
    return d / "train.jsonl", d / "valid.jsonl"


@pytest.mark.parametrize("name", ["batch", "train", "quantize"])
def test_killed_commands_rerun_to_the_uninterrupted_result(name: str, phrasebank, tmp_path: Path) -> None:
    case = {"batch": crash.batch_case, "train": lambda: crash.train_case(*phrasebank), "quantize": crash.quantize_case}[name]()
    row = crash.campaign(case, tmp_path, kill_points=2, kills_per_trial=2, seed=1)
    assert not row.problems, row.problems
    assert row.kill_points == 2 and row.reruns == row.reruns_correct == 1
    assert row.killed_running >= 1  # the kills landed while the command ran, not after it ended


def test_a_broken_invariant_is_reported(tmp_path: Path) -> None:
    """The harness itself: a command whose rerun leaves a wrong result is reported, not passed."""
    case = crash.Case("wrong", lambda work, again: ["python3", "-c", f"open('{work}/x', 'w').write('{int(again)}')"],
                      after_kill=lambda work: [], after_rerun=lambda work, ref: [] if (work / "x").read_text() == (ref / "x").read_text() else ["differs"])
    row = crash.campaign(case, tmp_path, kill_points=1, kills_per_trial=1, seed=0)
    assert row.reruns == 1 and row.reruns_correct == 0 and row.problems == ["trial 0: differs"]
