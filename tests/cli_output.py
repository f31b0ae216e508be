"""Reading `lmk` output in tests: the body rows of its rich tables, and its one-line errors."""

from __future__ import annotations


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in `text`, as lists of stripped cells."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def one_error_line(out, *parts: str) -> None:
    """`out` (test_cli.invoke's result) failed with one `error:` line on stderr, nothing on stdout, naming `parts`."""
    assert out.returncode == 1 and out.stdout == "", (out.returncode, out.stdout)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for part in parts:
        assert part in out.stderr, (part, out.stderr)
