"""`lmk monitor` end to end: a PhraseBank classifier trained with `lmk train`, a replayed news stream with an
injected burst of negative sentences, alerts on stdout and to a webhook on 127.0.0.1."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from shared_paths import SHARED_DATA
from test_cli import invoke

pytestmark = pytest.mark.slow  # CLI processes and a server: `make test` runs it, `make test-fast` does not

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (PHRASEBANK / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick PhraseBank classifier: 120 training sentences of each label, two epochs (about 0.71 accuracy)."""
    d = tmp_path_factory.mktemp("monitor")
    by_label: dict[str, list[dict]] = {}
    for row in rows("train.jsonl"):
        by_label.setdefault(row["label"], []).append(row)
    subset = [row for label in sorted(by_label) for row in by_label[label][:120]]
    random.Random(0).shuffle(subset)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset), encoding="utf-8")
    out = invoke("train", "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(d / "train.jsonl"),
                 "--epochs", "2", "--lr", "2e-4", "--no-checkpointing", "-o", str(d / "run"))
    assert out.returncode == 0, out.stderr
    return d / "run"


def news_stream() -> tuple[list[dict], range]:
    """Validation sentences (unseen in training): 490 calm ones with 4% negatives, a burst of 75 with 80%
    negatives, then 160 calm ones. Each record carries a time; returns the records and the burst's times."""
    rng = random.Random(1)
    valid = rows("valid.jsonl")
    negatives = [r for r in valid if r["label"] == "negative"]
    others = [r for r in valid if r["label"] != "negative"]
    rng.shuffle(negatives)
    rng.shuffle(others)
    calm = others[:470] + negatives[:20]
    burst = negatives[20:80] + others[470:485]
    tail = others[485:] + negatives[80:]
    rng.shuffle(calm)
    rng.shuffle(burst)
    rng.shuffle(tail)
    texts = calm + burst + tail
    start = 1_700_000_000
    records = [{"text": r["text"], "time": start + 60 * i} for i, r in enumerate(texts)]
    return records, range(start + 60 * len(calm), start + 60 * (len(calm) + len(burst)), 60)


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_burst_of_negative_news_raises_exactly_one_alert(classifier: Path) -> None:
    records, burst = news_stream()
    feed = "".join(json.dumps(r) + "\n" for r in records)
    feed = feed.replace(json.dumps(records[100]) + "\n", json.dumps(records[100]) + "\nnot a record\n")
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([sys.executable, "-m", "lmkernel.cli", "monitor", "--model", str(classifier), "--input", "-",
                              "--batch-size", "32",
                              "--webhook", f"http://127.0.0.1:{hook.server_port}/alerts"],
                             input=feed, capture_output=True, text=True, timeout=300)
    finally:
        hook.shutdown()
    assert out.returncode == 0, out.stderr
    alerts = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(alerts) == 1, out.stdout
    alert = alerts[0]
    assert set(alert) >= {"alert", "label", "share", "baseline", "detector", "score", "at", "onset"}
    assert alert["label"] == "negative" and alert["at"] in burst[:20], (alert, burst)  # the defaults: CUSUM
    assert alert["detector"] == "cusum" and alert["score"] >= 6.5 and abs(alert["onset"] - 490) <= 10
    assert Hook.received == [alert]
    log = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert {"event": "skipped", "line": 102, "reason": "<stdin>:102: not JSON (Expecting value)"} in log
    done = log[-1]
    assert done["event"] == "done" and done["records"] == len(records) and done["alerts"] == 1


def test_bad_settings_and_models_are_refused_clearly(classifier: Path, tmp_path: Path) -> None:
    out = invoke("monitor", "--model", str(classifier), "--input", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 1 and "--input" in out.stderr and "no such file" in out.stderr
    feed = tmp_path / "feed.jsonl"
    feed.write_text('{"text": "Profit rose."}\n')
    out = invoke("monitor", "--model", str(classifier), "--input", str(feed), "--label", "bearish")
    assert out.returncode == 1 and "the classifier's labels are negative, neutral, positive" in out.stderr
    out = invoke("monitor", "--model", "all-minilm-l6-v2", "--input", str(feed))
    assert out.returncode == 1 and "not a classifier" in out.stderr
    out = invoke("monitor", "--model", str(classifier), "--input", str(feed), "--window", "3")
    assert out.returncode == 1 and "--window must be at least 10" in out.stderr
    out = invoke("monitor", "--model", str(classifier), "--input", str(feed), "--detector", "ewma")
    assert out.returncode == 1 and "--detector must be one of cusum, window" in out.stderr
