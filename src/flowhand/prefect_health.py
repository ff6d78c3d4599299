"""Prefect's worker healthcheck (`--with-healthcheck`): GET /health, by Prefect's rule.

Prefect's worker answers 200 `{"message": "OK"}` while it polled for scheduled runs within the
last 30 poll intervals (PREFECT_WORKER_QUERY_SECONDS, flowhand's `poll_interval_seconds`), and
503 `{"message": "Worker may be unresponsive at this time"}` otherwise, counting from start-up
until the first poll. It listens on PREFECT_WORKER_WEBSERVER_HOST:PORT from the moment the
process starts, before the pool is read. flowhand does the same; when `[http]` is enabled on
the same port, this one listener answers flowhand's /healthz, /readyz and /metrics as well.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import anyio
import anyio.abc
import structlog

from flowhand.config import Config
from flowhand.http import NOT_FOUND, Answer, route, serve_routes
from flowhand.metrics import Metrics
from flowhand.worker.health import Health

log = structlog.get_logger("flowhand.health")

#: Prefect's window: a worker that has not polled for this many poll intervals is unhealthy.
POLL_INTERVALS = 30


class _Worker(Protocol):
    @property
    def health(self) -> Health: ...

    @property
    def metrics(self) -> Metrics: ...


class PollHealth:
    """Healthy while the last successful poll (or start-up) is within 30 poll intervals."""

    def __init__(self, poll_interval_seconds: float, serves_http: bool = False) -> None:
        self.window_seconds = POLL_INTERVALS * poll_interval_seconds
        self.started_at = time.monotonic()
        #: Set once the worker exists; until then health counts from start-up.
        self.worker: _Worker | None = None
        #: Whether this listener also answers flowhand's own endpoints.
        self.serves_http = serves_http
        self._said_unhealthy = False

    def healthy(self) -> bool:
        last = self.started_at
        polled = self.worker.health.last_poll_at if self.worker is not None else None
        if polled is not None:
            last = max(last, polled)
        age = time.monotonic() - last
        ok = age <= self.window_seconds
        if not ok and not self._said_unhealthy:
            log.error("health.unhealthy", seconds_since_last_poll=round(age, 1),
                      window_seconds=self.window_seconds,
                      hint="the worker has not polled for 30 poll intervals; restart it")
        self._said_unhealthy = not ok
        return ok

    def answer(self, path: str) -> Answer:
        if path == "/health":
            if self.healthy():
                return "200 OK", "application/json", json.dumps({"message": "OK"}).encode()
            body = {"message": "Worker may be unresponsive at this time"}
            return "503 Service Unavailable", "application/json", json.dumps(body).encode()
        if not self.serves_http:
            return NOT_FOUND[0], NOT_FOUND[1], b"not found: try /health\n"
        if self.worker is None:
            if path in ("/healthz", "/readyz", "/metrics"):
                body = {"status": "unavailable",
                        "reason": "starting: the worker does not exist yet"}
                return "503 Service Unavailable", "application/json", json.dumps(body).encode()
            return NOT_FOUND
        worker = self.worker
        return route(path, worker.health.liveness, worker.health.readiness, worker.metrics)


def shares_http_port(config: Config) -> bool:
    """Whether `[http]` and the healthcheck ask for the same port (one listener serves both)."""
    return (config.healthcheck.enabled and config.http.enabled
            and config.http.port == config.healthcheck.port and config.http.port != 0)


async def serve_health(
    config: Config,
    health: PollHealth,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /health on PREFECT_WORKER_WEBSERVER_HOST:PORT until cancelled."""
    await serve_routes(config.healthcheck.host, config.healthcheck.port, health.answer,
                       name="healthcheck", task_status=task_status)
