"""`lmk monitor`: alerts when a label's share jumps in a stream of classified texts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from lmkernel.apps.stream_monitor import MonitorConfig
from lmkernel.cli import Device, Opt, app, fail
from lmkernel.errors import LmkError

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
    import json as _json
    import sys

    from lmkernel.apps.detectors import make_detector
    from lmkernel.apps.stream_monitor import monitor as run, read_records
    from lmkernel.engine.llm import LLM

    def log(**event: object) -> None:
        print(_json.dumps(event), file=sys.stderr, flush=True)

    try:
        detector = make_detector(MonitorConfig(label, window, baseline, alert_z, reset_z, detector=detector, shift=shift,
                                               threshold=threshold, lag=lag, min_history=min_history))
        if input != "-" and not Path(input).is_file():
            raise LmkError(f"--input {input}: no such file")
        llm = LLM(model, device=device)
        if not llm.loaded.config.is_classifier:
            raise LmkError(f"--model {model}: not a classifier (train one with `lmk train --task classify`)")
        labels = list(llm.loaded.config.id2label.values())
        if label not in labels:
            raise LmkError(f"--label {label}: the classifier's labels are {', '.join(labels)}")
        try:
            from lmkernel.apps.monitor_sinks import MonitorMetrics, post_webhook
        except ImportError as exc:
            raise LmkError(f"lmk monitor needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)") from None
        metrics = MonitorMetrics(labels, label)
        if metrics_port is not None:
            metrics.serve(metrics_port)
    except (LmkError, ValueError, OSError) as exc:
        raise fail(exc) from None
    stream = sys.stdin if input == "-" else open(input, encoding="utf-8")

    def on_alert(alert) -> None:
        metrics.alert(alert)
        log(event="alert", label=alert.label, index=alert.index, onset=alert.onset, score=alert.score)
        if webhook:
            post_webhook(webhook, alert)

    def on_batch(new: int, seen: int) -> None:
        shares = detector.shares()
        metrics.observe(new, shares, detector.baseline_share(), detector.score, detector.armed)
        if seen // 500 > (seen - new) // 500:
            log(event="progress", records=seen, shares={k: round(v, 3) for k, v in shares.items()})

    records = read_records(stream, "<stdin>" if input == "-" else input,
                           lambda line, reason: log(event="skipped", line=line, reason=reason))
    try:
        alerts = run(records, lambda texts: [c.label for c in llm.classify(texts)], detector, sys.stdout, on_alert,
                     on_batch, batch_size or (1 if input == "-" else 32))
    except KeyboardInterrupt:
        alerts = None
    finally:
        if stream is not sys.stdin:
            stream.close()
    log(event="done", records=detector.records, alerts=alerts, shares={k: round(v, 3) for k, v in detector.shares().items()})
