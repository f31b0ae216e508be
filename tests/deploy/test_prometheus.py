"""deploy/: the alerting rules under promtool, the dashboard's queries, and a real Prometheus scraping a real
`lmk serve` until a rule fires."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from shared_paths import REPO_ROOT

from lmkernel.bench.serve import ServerProcess as Server
from lmkernel.bench.serve import free_port, start_server_process

pytestmark = pytest.mark.slow  # a real server and Prometheus: `make test` runs it, `make test-fast` does not

MODEL = "smollm2-135m-instruct"
DEPLOY = REPO_ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed; `make test` installs Debian's prometheus package"
    return path


def rule_expressions() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "lmkernel.json").read_text())
    return [t["expr"].replace("$__rate_interval", "1m") for p in dashboard["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = start_server_process([MODEL, "--kv-cache-memory", "64MiB"], tmp_path_factory.mktemp("serve") / "serve.log")
    yield s
    s.stop()


def test_alert_rules_pass_their_unit_tests() -> None:
    out = subprocess.run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    assert set(rule_expressions()) == {"LmkernelSlowFirstToken", "LmkernelHighErrorRatio", "LmkernelQueueBacklog",
                                       "LmkernelKVCacheNearlyFull", "LmkernelPreempting", "LmkernelNoReadyReplica"}


def test_every_query_is_valid_promql_over_exported_metrics(server: Server, tmp_path: Path) -> None:
    httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    exported = {line.split("{")[0].split()[0] for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                if line.startswith("lmkernel_")}
    queries = list(rule_expressions().values()) + dashboard_expressions()
    assert len(queries) > 20
    for query in queries:
        names = set(re.findall(r"lmkernel_\w+", query))
        assert names <= exported, f"{query}: {names - exported} not exported"
        assert names or "up{" in query, query
    rules = {"groups": [{"name": "check", "rules": [{"record": f"check:q{i}", "expr": q} for i, q in enumerate(queries)]}]}
    (tmp_path / "check.yml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([tool("promtool"), "check", "rules", str(tmp_path / "check.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def prometheus_api(url: str, path: str, **params: str) -> dict:
    body = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def test_prometheus_scrapes_the_server_and_alerts_when_it_goes(server: Server, tmp_path: Path) -> None:
    """Runs last in this module: it stops the module's server."""
    # The rules as shipped, with every hold time ("for: 1m") cut to zero so the test takes seconds.
    (tmp_path / "alerts.yml").write_text(re.sub(r"for: \w+", "for: 0s", RULES.read_text()))
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["alerts.yml"],
              "scrape_configs": [{"job_name": "lmkernel", "static_configs": [{"targets": [server.url.removeprefix("http://")]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "wb")
    prometheus = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return prometheus.poll() is not None
        wait_for(ready, "Prometheus ready")
        assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()

        before = wait_for(lambda: prometheus_api(url, "query", query='sum(lmkernel_requests_total{job="lmkernel"})')["result"],
                          "a first scrape")
        sent = 3
        for _ in range(sent):
            r = httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200
        total = float(before[0]["value"][1]) + sent

        def counted() -> bool:
            result = prometheus_api(url, "query", query='sum(lmkernel_requests_total{job="lmkernel", status="200"})')["result"]
            return bool(result) and float(result[0]["value"][1]) >= total
        wait_for(counted, "the completions counted through a scrape", timeout=30)
        ready_value = prometheus_api(url, "query", query='lmkernel_ready{job="lmkernel"}')["result"]
        assert [float(v["value"][1]) for v in ready_value] == [1.0]

        def alerts() -> dict[str, str]:
            return {a["labels"]["alertname"]: a["state"] for a in prometheus_api(url, "alerts")["alerts"]}
        evaluated = prometheus_api(url, "rules")["groups"][0]
        assert evaluated["name"] == "lmkernel" and not evaluated["lastEvaluation"].startswith("0001")
        assert "LmkernelNoReadyReplica" not in alerts()

        server.process.kill()
        server.process.wait()
        firing = wait_for(lambda: alerts().get("LmkernelNoReadyReplica") == "firing", "LmkernelNoReadyReplica firing",
                          timeout=30)
        assert firing
        assert {name for name, state in alerts().items() if state == "firing"} == {"LmkernelNoReadyReplica"}
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()
