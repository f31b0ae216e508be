"""lmkernel.cli.bench_robustness (`lmk bench crash, soak`): arguments handed on, the tables and lines, exit 1 when anything went wrong."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from cli_output import one_error_line, table_rows
from test_cli import invoke

from lmkernel.bench import crash, soak
from lmkernel.bench.crash import Row
from lmkernel.bench.soak import Sample, SoakReport


def test_crash_refuses_an_unknown_command_naming_the_known_ones(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(crash, "campaign", lambda *a: pytest.fail("ran a campaign"))
    one_error_line(invoke("bench", "crash", "--command", "batch", "--command", "nope", "--work-dir", str(tmp_path)),
                   "--command nope: expected some of batch, train, quantize, pull, recommend, tune")


def campaigns(monkeypatch, problems: dict[str, list[str]]) -> list[tuple]:
    ran = []

    def campaign(case, root, kill_points, kills_per_trial, seed):
        ran.append((case.name, root, kill_points, kills_per_trial, seed))
        return Row(case.name, kill_points, kill_points - 1, 2, 2 - len(problems.get(case.name, [])), 4.25,
                   problems.get(case.name, []))

    monkeypatch.setattr(crash, "campaign", campaign)
    return ran


def test_crash_runs_the_chosen_commands_and_passes_when_every_rerun_ended_right(monkeypatch, tmp_path: Path) -> None:
    ran = campaigns(monkeypatch, {})
    out = invoke("bench", "crash", "--command", "quantize", "--command", "batch", "--kill-points", "3",
                 "--kills-per-trial", "2", "--seed", "9", "--work-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert ran == [("lmk quantize", tmp_path, 3, 2, 9), ("lmk batch", tmp_path, 3, 2, 9)]
    assert "(seed 9)" in out.stdout
    assert table_rows(out.stdout) == [["lmk quantize", "3", "2", "2", "2 of 2", "4.2"],
                                      ["lmk batch", "3", "2", "2", "2 of 2", "4.2"]]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 32  # the cases' data, written into --work-dir


def test_crash_fails_and_names_each_problem_after_the_table(monkeypatch, tmp_path: Path) -> None:
    campaigns(monkeypatch, {"lmk train": ["rerun 2: checkpoint-4 half written"]})
    out = invoke("bench", "crash", "--command", "train", "--command", "pull", "--work-dir", str(tmp_path))
    assert out.returncode == 1
    assert table_rows(out.stdout) == [["lmk train", "20", "19", "2", "1 of 2", "4.2"], ["lmk pull", "20", "19", "2", "2 of 2", "4.2"]]
    assert out.stdout.splitlines()[-1] == "lmk train: rerun 2: checkpoint-4 half written"


def _report() -> SoakReport:
    """Ninety seconds, a sample every ten: resident memory 100 MiB + 1 a sample, tokens ever faster, the CPU
    half a second a second; three chat requests (one a third) and one malformed one."""
    r = SoakReport(90.0)
    tokens = [0, 100, 200, 300, 500, 700, 900, 1200, 1500, 1800]
    r.samples = [Sample(at=10 * i, rss_mib=100 + i, fds=12, threads=5 + (i > 4), cpu_s=5 * i, tokens=t, steal_s=0.0,
                        probe_gflops=40.0) for i, t in enumerate(tokens)]
    r.counts = defaultdict(lambda: defaultdict(int), {"chat": defaultdict(int, {200: 3}),
                                                      "malformed": defaultdict(int, {400: 1})})
    r.latencies["chat"] = [(5.0, 1.0), (35.0, 1.5), (65.0, 2.0)]
    r.latencies["malformed"] = []
    r.kv_free = r.kv_total = 64
    r.exit_code = 0
    return r


def test_soak_hands_over_its_settings_and_prints_latency_memory_and_work_by_third(monkeypatch) -> None:
    seen = {}

    def fake_soak(model, embedding_model, seconds, clients, log_dir, kv_cache_memory, seed):
        seen.update(model=model, embed=embedding_model, seconds=seconds, clients=clients, logs=log_dir.is_dir(),
                    kv=kv_cache_memory, seed=seed)
        return _report()

    monkeypatch.setattr(soak, "soak", fake_soak)
    out = invoke("bench", "soak", "--model", "m", "--embedding-model", "e", "--minutes", "1.5", "--clients", "4",
                 "--kv-cache-memory", "64MiB", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert seen == {"model": "m", "embed": "e", "seconds": 90.0, "clients": 4, "logs": True, "kv": "64MiB", "seed": 3}
    assert "m + e, 4 clients, 1.5 min" in out.stdout
    assert table_rows(out.stdout) == [
        ["chat", "3", "200: 3", "1.00 / 1.00", "1.50 / 1.50", "2.00 / 2.00", "2.00", "2.00"],
        ["malformed", "1", "400: 1", "", "", "", "", ""],
    ]
    text = " ".join(out.stdout.split())
    # warm-up ends at the sample at 20 s (102 MiB), the middle is the sample at 50 s; 109 / 102 - 1 = +6.9%
    assert ("resident memory 100 / 102 / 105 / 109 MiB (start / after warm-up / middle / end), drift after warm-up "
            "+6.9%; descriptors 12 / 12 / 12 / 12; threads 5 / 5 / 6 / 6; KV blocks free at the end 64 of 64; 5xx 0; "
            "unexpected statuses none; exit code after SIGTERM 0") in text
    # thirds of 30 s: 300, 600 and 900 tokens for 15 CPU seconds each
    assert ("by third: generated tokens/s 10.0 / 20.0 / 30.0; server CPU ms a generated token 50.0 / 25.0 / 16.7; "
            "host steal 0.0% / 0.0% / 0.0%; one-thread probe GFLOP/s 40.0 / 40.0 / 40.0") in text


@pytest.mark.parametrize("spoil", [
    lambda r: r.counts["chat"].__setitem__(503, 1),
    lambda r: r.counts["malformed"].__setitem__(200, 1),
    lambda r: r.errors.append("stream: connection reset"),
    lambda r: setattr(r, "exit_code", -9),
    lambda r: setattr(r, "kv_free", 60),
], ids=["5xx", "unexpected status", "transport error", "exit code", "KV blocks kept"])
def test_soak_fails_on_anything_that_went_wrong(monkeypatch, spoil) -> None:
    report = _report()
    spoil(report)
    monkeypatch.setattr(soak, "soak", lambda *a: report)
    out = invoke("bench", "soak", "--minutes", "1.5")
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr


def test_soak_prints_transport_errors_and_reports_a_failed_start_as_one_line(monkeypatch) -> None:
    report = _report()
    report.errors = [f"chat: reset {i}" for i in range(25)]
    monkeypatch.setattr(soak, "soak", lambda *a: report)
    out = invoke("bench", "soak")
    assert out.returncode == 1
    assert out.stdout.splitlines()[-20:] == [f"chat: reset {i}" for i in range(20)]  # the first 20

    def fails(*args):
        raise ValueError("kv_cache_memory must look like '2GiB', '512MB' or a byte count; got 'x'")

    monkeypatch.setattr(soak, "soak", fails)
    one_error_line(invoke("bench", "soak", "--kv-cache-memory", "x"), "kv_cache_memory", "got 'x'")
