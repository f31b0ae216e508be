"""The benchmarks' texts: prompts come from the text shipped in the package (no file outside it), and
a benchmark that needs the repository's shared data says which file is missing and which option to pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmkernel.bench import workload
from lmkernel.bench.workload import bench_text, shared_file, text_workload
from lmkernel.cli import app
from lmkernel.errors import LmkError


def test_the_default_prompts_come_from_the_packaged_text(smollm) -> None:
    text = bench_text()
    assert 15_000 < len(text.encode()) < 30_000 and text.isascii()
    assert (Path(workload.__file__).parents[1] / "data" / "bench_text.txt").is_file()  # package data, beside the code
    work = text_workload(smollm.tokenizer, 16, (16, 512), (1, 8), seed=3)
    assert len(work.prompts) == 16 and all(16 <= len(p) <= 512 for p in work.prompts)
    ids = smollm.tokenizer.encode(text, add_special_tokens=False)
    start = ids.index(work.prompts[0][0])
    assert any(ids[i : i + len(work.prompts[0])] == work.prompts[0] for i in range(start, len(ids)))
    assert text_workload(smollm.tokenizer, 16, (16, 512), (1, 8), seed=3) == work
    with pytest.raises(LmkError, match="too short"):
        text_workload(smollm.tokenizer, 1, (len(ids), len(ids)), (1, 1))


def test_shared_data_missing_names_the_option(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(workload, "SHARED_DATA", tmp_path / "shared" / "data")
    with pytest.raises(LmkError, match=r"wikitext-2/valid.txt: not found .*pass --text"):
        shared_file("wikitext-2/valid.txt", "--text")
    with pytest.raises(LmkError, match="--text .*nothing.txt: no such file"):
        shared_file("wikitext-2/valid.txt", "--text", tmp_path / "nothing.txt")
    given = tmp_path / "mine.txt"
    given.write_text("some text")
    assert shared_file("wikitext-2/valid.txt", "--text", given) == given

    runner = CliRunner()
    for args, option in ((["bench", "compress"], "--text"), (["bench", "train", "--skip-quality"], "--train-data")):
        out = runner.invoke(app, args, env={"COLUMNS": "250"})
        assert out.exit_code == 1 and f"pass {option}" in out.stderr and "not found" in out.stderr, out.output
        assert out.exception is None or isinstance(out.exception, SystemExit)
