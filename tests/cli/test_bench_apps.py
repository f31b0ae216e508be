"""lmkernel.cli.bench_apps (`lmk bench train, monitor, recommend, batch`): arguments handed on, tables and ratios, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_output import one_error_line, table_rows
from test_cli import invoke

import lmkernel.apps.recommend_data
import lmkernel.bench.workload
import lmkernel.loading
from lmkernel.bench import batch as bench_batch
from lmkernel.bench import monitor as bench_monitor
from lmkernel.bench import recommend as bench_recommend
from lmkernel.bench import train as bench_train
from lmkernel.bench.batch import Side
from lmkernel.bench.monitor import DelayRow, Replay
from lmkernel.registry import resolve


@pytest.fixture
def phrasebank(tmp_path: Path) -> tuple[Path, Path]:
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text('{"text": "Profit rose.", "label": "positive"}\n')
    valid.write_text('{"text": "Sales fell.", "label": "negative"}\n{"text": "Flat year.", "label": "neutral"}\n')
    return train, valid


def fake_children(monkeypatch, results: dict[tuple[str, bool], dict]) -> list[tuple]:
    ran = []

    def run_child(side, *flags):
        ran.append((side, *flags))
        return results[side, "--lora" in flags]

    monkeypatch.setattr(bench_train, "run_child", run_child)
    return ran


SPEED = {("ours", False): {"tokens_per_s": 3000.0, "peak_rss_bytes": 400e6},
         ("hf", False): {"tokens_per_s": 2000.0, "peak_rss_bytes": 800e6},
         ("ours", True): {"tokens_per_s": 4500.0, "peak_rss_bytes": 300e6},
         ("hf", True): {"tokens_per_s": 1800.0, "peak_rss_bytes": 1200e6}}


def test_train_runs_each_side_in_a_child_and_prints_speed_and_memory_ratios(monkeypatch, phrasebank) -> None:
    train, valid = phrasebank
    quality = {("quality", False): {"accuracy": 0.85, "macro_f1": 0.8125, "best_step": 120, "steps": 300, "seconds": 61.6},
               ("quality", True): {"accuracy": 0.8, "macro_f1": 0.75, "best_step": 300, "steps": 300, "seconds": 40.2}}
    ran = fake_children(monkeypatch, {**SPEED, **quality})
    out = invoke("bench", "train", "--steps", "5", "--batch-size", "4", "--train-data", str(train), "--valid-data", str(valid))
    assert out.returncode == 0, out.stderr
    model_dir = str(resolve("all-minilm-l6-v2").path)
    flags = ["--model", model_dir, "--data", str(train), "--steps", "5", "--batch-size", "4"]
    assert ran == [("ours", *flags), ("hf", *flags), ("ours", *flags, "--lora"), ("hf", *flags, "--lora"),
                   ("quality", "--model", model_dir, "--data", str(train), "--valid", str(valid)),
                   ("quality", "--model", model_dir, "--data", str(train), "--valid", str(valid), "--lora")]
    assert "all-minilm-l6-v2: 5 steps of 4 PhraseBank sentences" in out.stdout
    assert table_rows(out.stdout) == [
        ["full", "3,000", "2,000", "1.50x", "400", "800", "0.50x"],
        ["LoRA r=8", "4,500", "1,800", "2.50x", "300", "1,200", "0.25x"],
        ["full", "0.8500", "0.8125", "120/300", "62"],
        ["LoRA r=8", "0.8000", "0.7500", "300/300", "40"],
    ]


def test_train_with_skip_quality_runs_no_quality_child_and_a_failed_child_is_one_line(monkeypatch, phrasebank) -> None:
    train, _ = phrasebank
    ran = fake_children(monkeypatch, SPEED)
    out = invoke("bench", "train", "--skip-quality", "--train-data", str(train))
    assert out.returncode == 0, out.stderr
    assert [r[0] for r in ran] == ["ours", "hf", "ours", "hf"] and len(table_rows(out.stdout)) == 2

    def fails(side, *flags):
        raise RuntimeError("bench child 'hf' failed:\nout of memory")

    monkeypatch.setattr(bench_train, "run_child", fails)
    out = invoke("bench", "train", "--skip-quality", "--train-data", str(train))
    assert out.returncode == 1 and "error: bench child 'hf' failed:" in out.stderr and "Traceback" not in out.stderr


def test_bench_monitor_prints_both_detectors() -> None:
    out = invoke("bench", "monitor", "--streams", "5", "--calm-streams", "2", "--calm-records", "2000")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("false alerts per 10,000 calm records") == 2
    assert "cusum (shift 4, threshold 6.5)" in out.stdout and "window (200 / 1000, z 3)" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--shift", "1"], "--shift must be an odds ratio above 1"),
    (["--threshold", "0"], "--threshold must be a positive number"),
])
def test_monitor_bad_detector_settings_are_one_line(monkeypatch, args, message) -> None:
    monkeypatch.setattr(bench_monitor, "simulated_delays", lambda *a: pytest.fail("simulated"))
    one_error_line(invoke("bench", "monitor", *args), message)


def test_monitor_replays_the_classifiers_predictions_with_the_given_settings(monkeypatch, phrasebank) -> None:
    _, valid = phrasebank
    seen = {"simulated": [], "replayed": [], "false": []}
    row = DelayRow(300, 20, 0.5, 7.0, None, 0.95, 0.875, 0.0)

    def classifier_replay(model, rows, label, device):
        seen["replay"] = (model, rows, label, device)
        return Replay([True, True, False], [False, True, False, False])

    def simulated_delays(config, base, shapes, streams):
        seen["simulated"].append((config.detector, config.shift, config.threshold, base, len(shapes), streams))
        return [row]

    def replay_delays(replay, config, base, length, share, streams):
        seen["replayed"].append((config.detector, base, length, share, streams))
        return row

    monkeypatch.setattr(bench_monitor, "classifier_replay", classifier_replay)
    monkeypatch.setattr(bench_monitor, "simulated_delays", simulated_delays)
    monkeypatch.setattr(bench_monitor, "false_alerts_per_10k", lambda config, draw, records, streams: 1.5)
    monkeypatch.setattr(bench_monitor, "replay_delays", replay_delays)
    monkeypatch.setattr(bench_monitor, "replay_false_alerts",
                        lambda replay, config, base, records, streams: seen["false"].append((records, streams)) or 0.25)
    out = invoke("bench", "monitor", "--model", "clf", "--streams", "150", "--calm-records", "500", "--calm-streams", "12",
                 "--base", "0.2", "--shift", "3", "--threshold", "5", "--valid-data", str(valid), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert seen["replay"] == ("clf", [{"text": "Sales fell.", "label": "negative"}, {"text": "Flat year.", "label": "neutral"}],
                              "negative", "cpu")
    assert seen["simulated"] == [("cusum", 3.0, 5.0, 0.2, 11, 150), ("window", 4.0, 6.5, 0.2, 11, 150)]
    assert seen["replayed"][:5] == [("cusum", 0.2, n, s, 100) for n, s in ((20, 0.5), (40, 0.5), (60, 0.5), (60, 0.8), (60, 1.0))]
    assert seen["false"] == [(500, 2), (500, 2)]  # a fifth of the calm streams
    assert table_rows(out.stdout)[0] == ["300", "20", "50%", "7", "-", "95%", "88%", "0%"]
    assert "cusum (shift 3, threshold 5): 1.50 false alerts per 10,000 calm records (12 streams of 500)" in out.stdout
    text = " ".join(out.stdout.split())
    assert ("cusum (shift 3, threshold 5): 0.25 false alerts per 10,000 replayed calm sentences (predicted negative "
            "share 25.0% among the others, 66.7% among true negative)") in text


@pytest.mark.parametrize(("args", "message"), [
    (["--peer", "lightfm"], "--peer must be recbole; got 'lightfm'"),
    (["--peers", "Pop,Foo"], "--peers: Foo not among Pop, ItemKNN, BPR, SASRec"),
    (["--cold-peers", "Bar"], "--cold-peers: Bar not among Pop, ItemKNN, BPR, SASRec"),
    (["--cold-fraction", "0.5"], "--cold-fraction must be in [0, 0.5); got 0.5"),
    (["--cold-fraction", "-0.1"], "--cold-fraction must be in [0, 0.5); got -0.1"),
])
def test_recommend_checks_its_flags_before_reading_any_data(monkeypatch, args, message) -> None:
    monkeypatch.setattr(lmkernel.apps.recommend_data, "movielens_100k", lambda: pytest.fail("read the data"))
    one_error_line(invoke("bench", "recommend", *args), message)


def test_recommend_runs_both_splits_and_prints_lmkernels_ndcg_against_each_peer(monkeypatch, tmp_path: Path) -> None:
    seen = {"prepare": [], "run": []}
    monkeypatch.setattr(lmkernel.apps.recommend_data, "movielens_100k", lambda: ("inter", "item"))
    monkeypatch.setattr(lmkernel.apps.recommend_data, "read_items", lambda path: f"items of {path}")
    monkeypatch.setattr(lmkernel.apps.recommend_data, "read_interactions", lambda path, items: f"data of {path}")
    monkeypatch.setattr(bench_recommend, "temp_root", lambda: tmp_path)

    def prepare(data, items, root, name, cold_fraction, seed):
        seen["prepare"].append((data, items, root, name, cold_fraction, seed))
        return SimpleNamespace(name=name, targets={"u1": "a", "u2": "b"}, cold_users={"u2"} if cold_fraction else set())

    def run_models(prepared, config, root, models, timeout, log):
        seen["run"].append((prepared.name, config.encoder_training.steps, config.encoder_training.seed, config.seed, root,
                            models, timeout))
        ours = {"model": "lmkernel", "top10": {"u1": ["a", "x"], "u2": ["x", "b"]}, "seconds": 12.4}
        pop = {"model": "Pop", "top10": {"u1": ["x", "a"], "u2": ["y"]}, "test": {"ndcg@10": 0.31}, "epochs": 1, "seconds": 3.0}
        return [ours, pop], ["BPR: RecBole BPR failed: out of memory"]

    monkeypatch.setattr(bench_recommend, "prepare", prepare)
    monkeypatch.setattr(bench_recommend, "run_models", run_models)
    out = invoke("bench", "recommend", "--peers", "Pop,BPR", "--cold-peers", "Pop", "--cold-fraction", "0.2",
                 "--encoder-steps", "7", "--peer-timeout", "60", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert seen["prepare"] == [("data of inter", "items of item", tmp_path, "ml100k", 0.0, 3),
                               ("data of inter", "items of item", tmp_path, "ml100kcold", 0.2, 3)]
    assert seen["run"] == [("ml100k", 7, 3, 3, tmp_path, ["Pop", "BPR"], 60.0),
                           ("ml100kcold", 7, 3, 3, tmp_path, ["Pop"], 60.0)]
    assert "MovieLens-100k, cold start (20% of items)" in out.stdout
    assert out.stdout.count("not measured: BPR: RecBole BPR failed: out of memory") == 2
    ndcg_ours, ndcg_pop = (1 + 1 / math.log2(3)) / 2, 1 / math.log2(3) / 2  # ranks 1 and 2; rank 2 and a miss
    assert f"{ndcg_ours / ndcg_pop:.2f}x" == "2.58x"
    all_items = ["lmkernel", "2", "1.0000", f"{ndcg_ours:.4f}", "0.7500", "-", "-", "-", "12"]
    assert table_rows(out.stdout)[:2] == [all_items, ["Pop", "2", "0.5000", f"{ndcg_pop:.4f}", "0.2500", "2.58x", "0.3100", "1", "3"]]
    assert table_rows(out.stdout)[2:] == [
        all_items, ["Pop", "2", "0.5000", f"{ndcg_pop:.4f}", "0.2500", "2.58x", "0.3100", "1", "3"],
        ["lmkernel (cold users)", "1", "1.0000", f"{1 / math.log2(3):.4f}", "0.5000", "-", "-", "-", "12"],
        ["Pop (cold users)", "1", "0.0000", "0.0000", "0.0000", "peer 0", "-", "1", "3"],
    ]


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt-tokens", "256-64"], "--prompt-tokens must be MIN-MAX tokens, e.g. 64-256; got '256-64'"),
    (["--prompt-tokens", "0-8"], "--prompt-tokens must be MIN-MAX tokens, e.g. 64-256; got '0-8'"),
    (["--output-tokens", "32"], "--output-tokens must be MIN-MAX tokens, e.g. 64-256; got '32'"),
])
def test_batch_refuses_a_span_that_is_not_min_max(monkeypatch, args, message) -> None:
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(tokenizer="TOK"))
    monkeypatch.setattr(bench_batch, "run_batch", lambda *a: pytest.fail("ran lmk batch"))
    one_error_line(invoke("bench", "batch", *args), message)


def test_batch_runs_the_same_requests_through_both_sides_and_prints_each_against_serve(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(lmkernel.loading, "load_model", lambda model: SimpleNamespace(tokenizer="TOK"))

    def text_workload(tokenizer, n, prompt_span, output_span, seed=0):
        seen["workload"] = (tokenizer, n, prompt_span, output_span, seed)
        return SimpleNamespace(prompts=[[1, 2, 3]] * n, output_lens=[4] * n)

    def run_batch(path, out, model, engine_args, requests):
        seen["batch"] = ([json.loads(line)["custom_id"] for line in path.read_text().splitlines()], out.name, model,
                         engine_args, requests)
        return Side("lmk batch", 10.0, 8, 1200)

    def run_serve(bodies, model, engine_args, clients, log):
        seen["serve"] = (len(bodies), bodies[0], model, engine_args, clients, log.name)
        return Side("lmk serve", 12.0, 8, 1200)

    monkeypatch.setattr(lmkernel.bench.workload, "text_workload", text_workload)
    monkeypatch.setattr(bench_batch, "run_batch", run_batch)
    monkeypatch.setattr(bench_batch, "run_serve", run_serve)
    out = invoke("bench", "batch", "--model", "m", "--requests", "8", "--clients", "3", "--prompt-tokens", "2-3",
                 "--output-tokens", "4-4", "--kv-cache-memory", "64MiB", "--seed", "2")
    assert out.returncode == 0, out.stderr
    assert seen["workload"] == ("TOK", 8, (2, 3), (4, 4), 2)
    assert seen["batch"] == ([f"r{i}" for i in range(8)], "out.jsonl", "m", ["--kv-cache-memory", "64MiB"], 8)
    assert seen["serve"] == (8, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
                             "m", ["--kv-cache-memory", "64MiB"], 3, "serve.log")
    assert "m: 8 completions (2-3 prompt, 4-4 generated tokens, greedy)" in out.stdout
    assert table_rows(out.stdout) == [["lmk batch", "10.0", "0.80", "120.0", "1.20x"],
                                      ["lmk serve", "12.0", "0.67", "100.0", "1.00x"]]
