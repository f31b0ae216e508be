"""The stream monitor's sinks (lmkernel/apps/monitor_sinks.py): the Prometheus gauges it keeps, and the
webhook it POSTs each alert to (a failure is reported on standard error, not raised)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from lmkernel.apps.monitor_sinks import MonitorMetrics, post_webhook
from lmkernel.apps.stream_monitor import Alert

ALERT = Alert(alert="negative_share_jump", label="negative", share=0.5, baseline=0.1, detector="cusum", score=7.25,
              at=412, index=412, onset=400)


def test_gauges_start_at_zero_and_follow_each_observation() -> None:
    m = MonitorMetrics(["negative", "neutral", "positive"], "negative")
    value = m.registry.get_sample_value
    assert [value("lmkernel_monitor_label_share", {"label": x}) for x in ("negative", "neutral", "positive")] == [0, 0, 0]
    assert value("lmkernel_monitor_alerts_total", {"label": "negative"}) == 0
    m.observe(10, {"negative": 0.25, "positive": 0.75}, baseline=0.1, score=2.5, armed=True)
    m.observe(5, {"negative": 0.5, "neutral": 0.5}, baseline=0.125, score=6.75, armed=False)
    assert value("lmkernel_monitor_records_total") == 15
    assert [value("lmkernel_monitor_label_share", {"label": x}) for x in ("negative", "neutral", "positive")] == [0.5, 0.5, 0]
    assert value("lmkernel_monitor_baseline_share", {"label": "negative"}) == 0.125
    assert value("lmkernel_monitor_score", {"label": "negative"}) == 6.75
    assert value("lmkernel_monitor_alert_active", {"label": "negative"}) == 1
    m.observe(1, {}, baseline=0.125, score=0.0, armed=True)
    assert value("lmkernel_monitor_alert_active", {"label": "negative"}) == 0


def test_each_alert_is_counted_under_its_label() -> None:
    m = MonitorMetrics(["negative", "positive"], "negative")
    m.alert(ALERT)
    m.alert(ALERT)
    assert m.registry.get_sample_value("lmkernel_monitor_alerts_total", {"label": "negative"}) == 2


def test_the_webhook_receives_the_alert_as_json() -> None:
    received: list[tuple[str, str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        post_webhook(f"http://127.0.0.1:{server.server_port}/hook", ALERT, timeout=5)
        thread.join(5)
    finally:
        server.server_close()
    assert received == [("/hook", "application/json", json.loads(ALERT.to_json()))]


def test_a_webhook_that_is_not_http_is_reported_on_stderr(capsys) -> None:
    post_webhook("file:///etc/passwd", ALERT)
    out = capsys.readouterr()
    assert out.out == ""
    assert json.loads(out.err) == {"event": "webhook_failed", "url": "file:///etc/passwd",
                                   "error": "a webhook URL must be http:// or https://"}
