"""`lmk monitor`: alerts when a label's share jumps in a stream of classified texts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from lmkernel.apps.stream_monitor import Detector, MonitorConfig
from lmkernel.cli import Device, Opt, app, fail
from lmkernel.errors import LmkError

if TYPE_CHECKING:
    from lmkernel.apps.monitor_sinks import MonitorMetrics
    from lmkernel.engine.llm import LLM

DEFAULTS = MonitorConfig()


@app.command()
def monitor(
    model: Annotated[str, Opt(help="a classifier: a run directory of `lmk train --task classify`, or its model")],
    input: Annotated[str, Opt("--input", help="JSON lines with \"text\" (and \"time\"): a file, or - for standard input")],
    label: Annotated[str, Opt(help="the label whose share is watched")] = "negative",
    detector: Annotated[str, Opt(help="cusum (flags a burst within a few records) or window (rolling share against baseline)")] = "cusum",
    shift: Annotated[float, Opt(help="cusum: the rise in the label's odds a burst is tuned to catch")] = DEFAULTS.shift,
    threshold: Annotated[float, Opt(help="cusum: alert when the log-likelihood ratio reaches this (higher: fewer false alerts, later)")] = DEFAULTS.threshold,
    lag: Annotated[int, Opt(help="cusum: records wait this long before joining the baseline")] = DEFAULTS.lag,
    min_history: Annotated[int, Opt(help="cusum: the first records only set the baseline")] = DEFAULTS.min_history,
    window: Annotated[int, Opt(help="records in the rolling window (the shares reported; the window detector's test)")] = DEFAULTS.window,
    baseline: Annotated[int, Opt(help="records that set the expected share")] = DEFAULTS.baseline,
    alert_z: Annotated[float, Opt(help="window: alert when the window's share is this many standard deviations above baseline")] = DEFAULTS.alert_z,
    reset_z: Annotated[float, Opt(help="window: re-arm once the share falls back below this z")] = DEFAULTS.reset_z,
    webhook: Annotated[str | None, Opt(help="POST each alert as JSON to this URL")] = None,
    metrics_port: Annotated[int | None, Opt(help="serve Prometheus gauges on 127.0.0.1:PORT/metrics")] = None,
    batch_size: Annotated[int | None, Opt(help="records classified at once (default 32 from a file, 1 from stdin)")] = None,
    device: Device = "auto",
) -> None:
    """Classify a stream of texts and print one JSON line per alert when a label's share jumps; logs go to stderr."""
    from lmkernel.apps.detectors import make_detector

    try:
        detector = make_detector(MonitorConfig(label, window, baseline, alert_z, reset_z, detector=detector, shift=shift,
                                               threshold=threshold, lag=lag, min_history=min_history))
        llm, metrics = _classifier_and_gauges(model, input, label, metrics_port, device)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    _run_stream(llm, detector, metrics, input, webhook, batch_size)


def _log(**event: object) -> None:
    """One JSON line on stderr: the monitor's standard output carries only the alerts."""
    print(json.dumps(event), file=sys.stderr, flush=True)


def _classifier_and_gauges(model: str, input: str, label: str, metrics_port: int | None, device: str) -> tuple[LLM, MonitorMetrics]:
    """The classifier and the Prometheus gauges, once the input, the model and the label are checked (before any
    record is read)."""
    from lmkernel.engine.llm import LLM

    if input != "-" and not Path(input).is_file():
        raise LmkError(f"--input {input}: no such file")
    llm = LLM(model, device=device)
    if not llm.loaded.config.is_classifier:
        raise LmkError(f"--model {model}: not a classifier (train one with `lmk train --task classify`)")
    labels = list(llm.loaded.config.id2label.values())
    if label not in labels:
        raise LmkError(f"--label {label}: the classifier's labels are {', '.join(labels)}")
    try:
        from lmkernel.apps.monitor_sinks import MonitorMetrics
    except ImportError as exc:
        raise LmkError(f"lmk monitor needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)") from None
    metrics = MonitorMetrics(labels, label)
    if metrics_port is not None:
        metrics.serve(metrics_port)
    return llm, metrics


def _run_stream(llm: LLM, detector: Detector, metrics: MonitorMetrics, input: str, webhook: str | None,
                batch_size: int | None) -> None:
    """Classify the records of `input` (a file, or - for stdin) in batches until it ends or Ctrl-C, feeding the
    detector, the gauges and the webhook; the last log line sums up the run."""
    from lmkernel.apps.monitor_sinks import post_webhook
    from lmkernel.apps.stream_monitor import monitor as run, read_records

    stream = sys.stdin if input == "-" else open(input, encoding="utf-8")

    def on_alert(alert) -> None:
        metrics.alert(alert)
        _log(event="alert", label=alert.label, index=alert.index, onset=alert.onset, score=alert.score)
        if webhook:
            post_webhook(webhook, alert)

    def on_batch(new: int, seen: int) -> None:
        shares = detector.shares()
        metrics.observe(new, shares, detector.baseline_share(), detector.score, detector.armed)
        if seen // 500 > (seen - new) // 500:
            _log(event="progress", records=seen, shares={k: round(v, 3) for k, v in shares.items()})

    records = read_records(stream, "<stdin>" if input == "-" else input,
                           lambda line, reason: _log(event="skipped", line=line, reason=reason))
    try:
        alerts = run(records, lambda texts: [c.label for c in llm.classify(texts)], detector, sys.stdout, on_alert,
                     on_batch, batch_size or (1 if input == "-" else 32))
    except KeyboardInterrupt:
        alerts = None
    finally:
        if stream is not sys.stdin:
            stream.close()
    _log(event="done", records=detector.records, alerts=alerts, shares={k: round(v, 3) for k, v in detector.shares().items()})
