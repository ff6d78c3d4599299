"""The Prefect server under the benchmark (backed by a private PostgreSQL cluster), and the
benchmark's client of its API."""

from __future__ import annotations

import concurrent.futures as cf
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.environment import BENCH_ENV, clean_env
from harness.api import API
from harness.prefect_server import PrefectServer

FINAL = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]


def start_server(home: Path, database_url: str) -> PrefectServer:
    """`prefect server start` from the benchmark's tool environment, on `database_url`."""
    settings = {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        # Keep connections to PostgreSQL open: with the default pool (5, overflow 10) the
        # server opens and closes a connection (a PostgreSQL process) per request under load.
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
    }
    prefect_home = home / "prefect-home"
    prefect_home.mkdir(exist_ok=True)
    try:
        return PrefectServer.start(prefect_home, extra_env=settings, env_dir=BENCH_ENV,
                                   inherit=clean_env(), ready_timeout=180)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


class BenchAPI(API):
    """Set-up and read-back for the benchmark: more connections, and 5xx answers retried."""

    def __init__(self, api_url: str) -> None:
        super().__init__(api_url, timeout=60, limits=httpx.Limits(max_connections=16))

    def call(self, method: str, path: str, **kw: Any) -> Any:
        delay = 0.2
        for attempt in range(12):
            try:
                response = self.http.request(method, path.lstrip("/"), **kw)
            except httpx.TransportError:
                if attempt == 11:
                    raise
            else:
                if response.status_code < 500 or attempt == 11:
                    break
            time.sleep(delay)
            delay = min(delay * 2, 5)
        response.raise_for_status()
        return response.json() if response.content else None

    def create_runs(self, deployment_id: str, times: list[datetime | None]) -> list[str]:
        """One run per entry: due at that time, or due now (the server's clock) for None."""
        def one(when: datetime | None) -> str:
            body: dict[str, Any] = {}
            if when is not None:
                body["state"] = {"type": "SCHEDULED",
                                 "state_details": {"scheduled_time": when.isoformat()}}
            run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
            return str(run["id"])

        with cf.ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, times))

    def pause_queue(self, pool: str, paused: bool) -> None:
        self.call("PATCH", f"/work_pools/{pool}/queues/default", json={"is_paused": paused})

    def count_final(self, deployment_id: str) -> int:
        return int(self.call("POST", "/flow_runs/count", json={"flow_runs": {
            "deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": FINAL}}}}))

    def workers(self, pool: str) -> list[dict[str, Any]]:
        return list(self.call("POST", f"/work_pools/{pool}/workers/filter", json={}))

    def flow_runs(self, deployment_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            page = self.call("POST", "/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 200, "offset": len(found)})
            found += page
            if len(page) < 200:
                return found

    def histories(self, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        def one(run_id: str) -> tuple[str, list[dict[str, Any]]]:
            return run_id, self.call("GET", "/flow_run_states/", params={"flow_run_id": run_id})

        with cf.ThreadPoolExecutor(8) as pool:
            return dict(pool.map(one, run_ids))

