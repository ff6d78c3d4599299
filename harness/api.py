"""A small synchronous client of Prefect's REST API, for set-up and read-back (tests, bench)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
#: httpx's own default.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class API:
    """Synchronous access to the Prefect API (set-up and read-back)."""

    def __init__(self, api_url: str, timeout: float = 30,
                 limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        self.http = httpx.Client(base_url=api_url + "/", timeout=timeout, limits=limits)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        for attempt in range(30):
            response = self.http.request(method, path.lstrip("/"), **kw)
            if response.status_code != 503:  # SQLite "database is locked" under load
                break
            time.sleep(0.1 * (attempt + 1))
        response.raise_for_status()
        return response.json() if response.content else None

    def create_pool(self, name: str | None = None, type: str = "process",
                    template: dict[str, Any] | None = None) -> str:
        name = name or f"pool-{uuid.uuid4().hex[:8]}"
        body: dict[str, Any] = {"name": name, "type": type}
        if template is not None:
            body["base_job_template"] = template
        self.call("POST", "/work_pools/", json=body)
        return name

    def create_deployment(self, pool: str, job_variables: dict[str, Any] | None = None,
                          name: str | None = None, flow_name: str = "test-flow",
                          **extra: Any) -> str:
        flow = self.call("POST", "/flows/", json={"name": flow_name})
        body = {
            "name": name or f"dep-{uuid.uuid4().hex[:8]}",
            "flow_id": flow["id"],
            "work_pool_name": pool,
            "job_variables": job_variables or {},
            **extra,
        }
        return str(self.call("POST", "/deployments/", json=body)["id"])

    def create_run(self, deployment_id: str, job_variables: dict[str, Any] | None = None,
                   **extra: Any) -> str:
        body: dict[str, Any] = {"job_variables": job_variables or {}, **extra}
        run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
        return str(run["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/flow_runs/{run_id}")
        return result

    def state(self, run_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self.flow_run(run_id)["state"]
        return state

    def history(self, run_id: str) -> list[dict[str, Any]]:
        states: list[dict[str, Any]] = self.call(
            "GET", "/flow_run_states/", params={"flow_run_id": run_id}
        )
        return states

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = self.call(
            "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}
        )
        return logs

    def wait_final(self, run_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state["type"] in FINAL:
                return state
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} not final after {timeout} s: {self.state(run_id)}")
