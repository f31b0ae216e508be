"""Where the stream monitor's findings go besides standard output: Prometheus gauges and a webhook."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from lmkernel.apps.stream_monitor import Alert


class MonitorMetrics:
    """Rolling share per label, baseline and detector score of the watched label, records and alerts counted."""

    def __init__(self, labels: Sequence[str], watched: str) -> None:
        self.registry = r = CollectorRegistry()
        self.share = Gauge("lmkernel_monitor_label_share", "Share of each label in the rolling window", ["label"], registry=r)
        self.baseline = Gauge("lmkernel_monitor_baseline_share", "Baseline share of the watched label", ["label"], registry=r)
        self.score = Gauge("lmkernel_monitor_score", "The detector's statistic for the watched label (CUSUM log-likelihood "
                           "ratio, or the window's z-score)", ["label"], registry=r)
        self.alerting = Gauge("lmkernel_monitor_alert_active", "1 from an alert until the share falls back", ["label"],
                              registry=r)
        self.records = Counter("lmkernel_monitor_records", "Records classified", registry=r)
        self.alerts = Counter("lmkernel_monitor_alerts", "Alerts raised", ["label"], registry=r)
        self.labels, self.watched = list(labels), watched
        for label in self.labels:
            self.share.labels(label).set(0)
        self.alerts.labels(watched)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, records: int, shares: dict[str, float], baseline: float, score: float, armed: bool) -> None:
        self.records.inc(records)
        for label in self.labels:
            self.share.labels(label).set(shares.get(label, 0.0))
        self.baseline.labels(self.watched).set(baseline)
        self.score.labels(self.watched).set(score)
        self.alerting.labels(self.watched).set(0 if armed else 1)

    def alert(self, alert: Alert) -> None:
        self.alerts.labels(alert.label).inc()


def post_webhook(url: str, alert: Alert, timeout: float = 5.0) -> None:
    """POST the alert as JSON to an http(s) URL; a failure is logged on standard error and the monitor goes on."""
    request = urllib.request.Request(url, data=alert.to_json().encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("a webhook URL must be http:// or https://")
        with urllib.request.urlopen(request, timeout=timeout):  # nosec B310  # the scheme is checked just above
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(json.dumps({"event": "webhook_failed", "url": url, "error": str(exc)}), file=sys.stderr, flush=True)
