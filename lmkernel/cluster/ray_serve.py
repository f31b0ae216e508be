"""`lmk serve --ray`: the same OpenAI-compatible app as a Ray Serve deployment whose replicas Ray's autoscaler
adds under load and removes when idle.

Each replica loads the models and builds the app exactly as `lmk serve` does in one process; Ray's HTTP
proxy spreads requests over the replicas and counts the ones in flight, which is what the autoscaler
follows (`target_ongoing_requests` per replica). The driver process stays in the foreground, logs each
change in the number of running replicas as a JSON line on standard error, and on SIGTERM or Ctrl-C
removes the application (and stops the Ray instance it started, if it started one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI

from lmkernel.config import EngineConfig
from lmkernel.errors import LmkError
from lmkernel.registry import resolve
from lmkernel.serve.app import ServerConfig
from lmkernel.serve.server import LaunchConfig, load_app, served_names, setup_logging

try:
    import ray
    from prometheus_client import start_http_server
    from ray import serve
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put
except ImportError as exc:  # the optional extra
    raise LmkError(f"--ray needs Ray Serve: pip install 'lmkernel[ray]' ({exc.name} is missing)") from None

APP_NAME = "lmkernel"
DEPLOYMENT_NAME = "LmkernelServer"
KV_NAMESPACE = "lmkernel"
METRICS_KEY_PREFIX = f"{APP_NAME}/metrics/"
PROXY_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, when to add and remove them, and which Ray cluster to run on."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # requests in flight per replica that the autoscaler aims for
    upscale_delay: float = 5.0  # seconds the load must stay above target before a replica is added
    downscale_delay: float = 60.0  # seconds of low load before a replica is removed
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica (also its torch threads)
    ray_address: str | None = None  # None: start a local Ray; "auto" or "HOST:PORT" or "ray://HOST:PORT": join one
    metrics_targets: str | None = None  # a Prometheus file_sd JSON file kept listing every replica's metrics address

    def check(self) -> ScaleConfig:
        problems = [
            (self.min_replicas < 0, "--min-replicas", "0 or more"),
            (self.max_replicas < max(1, self.min_replicas), "--max-replicas", "at least 1 and at least --min-replicas"),
            (not self.target_ongoing_requests > 0, "--target-ongoing-requests", "a positive number"),
            (self.upscale_delay < 0, "--upscale-delay", "0 or more seconds"),
            (self.downscale_delay < 0, "--downscale-delay", "0 or more seconds"),
            (not self.replica_cpus > 0, "--replica-cpus", "a positive number"),
        ]
        for bad, flag, expected in problems:
            if bad:
                raise LmkError(f"{flag} must be {expected}")
        return self


@serve.ingress()
class LmkernelServer:
    """One replica: the models and the app of a single-process `lmk serve`, plus its own /metrics port.

    Behind Ray's proxy a scrape of /metrics reaches one replica at random, so each replica also serves its
    metrics on a port of its own and files the address in Ray's key-value store, where the driver finds it.
    """

    def __init__(self, launch: LaunchConfig, config: ServerConfig) -> None:
        setup_logging()
        self.lmkernel_app = load_app(launch, config)  # not `app`: Ray's wrapper owns that name
        self.metrics_http, _ = start_http_server(0, addr=launch.host, registry=self.lmkernel_app.state.metrics.registry)
        host = ray.util.get_node_ip_address() if launch.host in ("0.0.0.0", "::") else launch.host  # nosec B104  # the replica binds the host the user gave (--host); the metrics address follows it
        self.metrics_key = METRICS_KEY_PREFIX + serve.get_replica_context().replica_id.unique_id
        _internal_kv_put(self.metrics_key, f"{host}:{self.metrics_http.server_port}", namespace=KV_NAMESPACE)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.lmkernel_app

    def __del__(self) -> None:
        if hasattr(self, "metrics_http"):
            _internal_kv_del(self.metrics_key, namespace=KV_NAMESPACE)
            self.metrics_http.shutdown()


def deployment(launch: LaunchConfig, config: ServerConfig, scale: ScaleConfig) -> Any:
    """The bound Serve application: autoscaling bounds, per-replica resources and graceful shutdown."""
    options = serve.deployment(
        LmkernelServer,
        name=DEPLOYMENT_NAME,
        autoscaling_config={
            "min_replicas": scale.min_replicas,
            "initial_replicas": max(1, scale.min_replicas),
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay,
            "downscale_delay_s": scale.downscale_delay,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        },
        # A replica takes as many requests as its engine batches; past that they wait in Ray's queue,
        # which the autoscaler counts as load.
        max_ongoing_requests=max(launch.engine.max_num_seqs, int(scale.target_ongoing_requests) + 1),
        ray_actor_options={"num_cpus": scale.replica_cpus},
        graceful_shutdown_timeout_s=launch.shutdown_grace,
        health_check_period_s=5.0,
    )
    # Each replica's torch threads are the CPUs Ray reserves for it, unless the engine names its own.
    threads = launch.engine.threads or max(1, int(scale.replica_cpus))
    return options.bind(replace(launch, engine=EngineConfig.build(launch.engine, threads=threads)), config)


def running_replicas() -> dict[str, int]:
    """Replica counts of the deployment by state (RUNNING, STARTING, STOPPING...)."""
    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(getattr(state, "value", state)): n for state, n in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def metrics_targets() -> list[str]:
    """HOST:PORT of every live replica's metrics; entries of replicas that died without cleaning up are dropped."""
    targets = []
    for key in _internal_kv_list(METRICS_KEY_PREFIX, namespace=KV_NAMESPACE):
        value = _internal_kv_get(key, namespace=KV_NAMESPACE)
        if value is None:
            continue
        host, _, port = value.decode().rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except OSError:
            _internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        targets.append(value.decode())
    return sorted(targets)


def write_targets(path: Path, targets: list[str]) -> None:
    """A Prometheus file_sd file (`file_sd_configs`), replaced atomically so Prometheus never reads half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([{"targets": targets, "labels": {"deployment": APP_NAME}}], indent=1) + "\n")
    os.replace(tmp, path)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT (or ray://HOST:PORT) where nothing listens: Ray itself retries for minutes."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise LmkError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise LmkError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def serve_on_ray(launch: LaunchConfig, config: ServerConfig, scale: ScaleConfig) -> None:
    """Deploy on Ray Serve, report scaling until SIGTERM or Ctrl-C, then remove the deployment."""
    check_launch(launch, scale)
    started_ray = scale.ray_address is None
    join_ray(scale.ray_address)
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve.start(http_options={"host": launch.host, "port": launch.port})
        try:
            serve.run(deployment(launch, config, scale), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise LmkError(f"Ray Serve could not start the lmkernel replicas: {exc}") from None
        print(f"lmkernel: serving {served_names(config)} on http://{launch.host}:{launch.port} with Ray Serve "
              f"({scale.min_replicas} to {scale.max_replicas} replicas)", flush=True)
        report_until(stop, scale.metrics_targets)
    finally:
        print(json.dumps({"event": "shutdown"}), file=sys.stderr, flush=True)
        leave_ray(started_ray)


def check_launch(launch: LaunchConfig, scale: ScaleConfig) -> None:
    """Fail in the driver, before Ray starts, on what every replica would fail on: the scaling flags, an unknown
    model, a --metrics-targets file that cannot be written (it starts empty)."""
    scale.check()
    for name in (launch.model, launch.embedding_model):
        if name is not None:
            resolve(name)  # an unknown model fails here, not in every replica
    if scale.metrics_targets is not None:
        try:
            write_targets(Path(scale.metrics_targets), [])
        except OSError as exc:
            raise LmkError(f"--metrics-targets {scale.metrics_targets}: cannot write there ({exc.strerror})") from None


def join_ray(address: str | None) -> None:
    """Start a Ray of this process's own (address None) or join the cluster at `address`, failing with what to fix."""
    if address is None:
        # Ray's processes inherit this one's environment. A small machine under load starts the HTTP proxy
        # slower than Ray's 5 s readiness check, which then kills and restarts it in a loop.
        for name, value in PROXY_PATIENCE.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
                 logging_level="WARNING")  # a new local Ray, not one another job started on this machine
        return
    check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
        raise LmkError(f"--ray-address {address}: Ray could not join that cluster ({exc}). A cluster with "
                       "token authentication needs RAY_AUTH_MODE=token here and its token (~/.ray/auth_token or "
                       "RAY_AUTH_TOKEN)") from None


def report_until(stop: threading.Event, targets_file: str | None) -> None:
    """Each second until `stop`: a JSON line on stderr when the replica counts or the metrics addresses change,
    and the addresses rewritten into `targets_file` (Prometheus file_sd) when given."""
    last: dict[str, int] = {}
    last_targets: list[str] | None = None
    while not stop.wait(1.0):
        counts = running_replicas()
        if counts != last:
            print(json.dumps({"event": "replicas", "running": counts.get("RUNNING", 0), "states": counts}),
                  file=sys.stderr, flush=True)
            last = counts
        targets = metrics_targets()
        if targets != last_targets:
            print(json.dumps({"event": "metrics_targets", "targets": targets}), file=sys.stderr, flush=True)
            if targets_file is not None:
                write_targets(Path(targets_file), targets)
            last_targets = targets


def leave_ray(started_ray: bool) -> None:
    """Remove lmkernel from Ray: the whole Ray this process started, or only its application from a cluster it
    joined (and Serve too, if lmkernel was all Serve ran there)."""
    if started_ray:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)
        if not serve.status().applications:  # Serve was there for lmkernel alone: leave the cluster as found
            serve.shutdown()
