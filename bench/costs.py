"""What each request a worker or an engine sends per run costs the Prefect server."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import httpx

from bench.sampler import read_proc
from bench.server import BenchAPI
from harness.prefect_server import PrefectServer


def request_costs(api: BenchAPI, server: PrefectServer, template: dict[str, Any],
                  n: int = 40) -> list[dict[str, Any]]:
    """The server's CPU time per request of each kind a worker or its engine sends per run.

    One request at a time against the otherwise idle server, its process's CPU time read from
    /proc before and after: what one run costs the server, whichever worker sends it.
    """
    assert server.process
    pid = server.process.pid
    pool = f"bench-costs-{uuid.uuid4().hex[:6]}"
    api.create_pool(pool, "process", template)
    dep = api.create_deployment(pool, {"command": "true"}, name=f"dep-{pool}",
                                flow_name="bench-costs")
    api.pause_queue(pool, True)
    ids = api.create_runs(dep, [None] * n)
    flow_id = api.call("GET", f"/flow_runs/{ids[0]}")["flow_id"]
    http = api.http

    def state(i: int, type_: str) -> httpx.Response:
        return http.post(f"flow_runs/{ids[i]}/set_state", json={
            "state": {"type": type_, "state_details": {"transition_id": str(uuid.uuid4())}}})

    kinds: list[tuple[str, str, Any]] = [
        ("poll (get_scheduled_flow_runs, 40 due)", "both",
         lambda i: http.post(f"work_pools/{pool}/get_scheduled_flow_runs",
                             json={"limit": n})),
        ("read the deployment", "both", lambda i: http.get(f"deployments/{dep}")),
        ("read the flow", "both", lambda i: http.get(f"flows/{flow_id}")),
        ("propose PENDING (the claim)", "both", lambda i: state(i, "PENDING")),
        ("read the state history", "flowhand", lambda i: http.get(
            "flow_run_states/", params={"flow_run_id": ids[i]})),
        ("PATCH labels", "both", lambda i: http.patch(
            f"flow_runs/{ids[i]}/labels", json={"prefect.worker.name": "bench"})),
        ("PATCH infrastructure_pid", "both", lambda i: http.patch(
            f"flow_runs/{ids[i]}", json={"infrastructure_pid": f"host:{i}"})),
        ("propose RUNNING", "engine", lambda i: state(i, "RUNNING")),
        ("propose COMPLETED", "engine", lambda i: state(i, "COMPLETED")),
        ("read the flow run", "flowhand", lambda i: http.get(f"flow_runs/{ids[i]}")),
        ("heartbeat", "both", lambda i: http.post(
            f"work_pools/{pool}/workers/heartbeat",
            json={"name": "bench", "heartbeat_interval_seconds": 30})),
    ]
    out = []
    for name, who, call in kinds:
        before, started = read_proc(pid), time.perf_counter()
        for i in range(n):
            call(i).raise_for_status()
        after, wall = read_proc(pid), time.perf_counter() - started
        if before and after:
            out.append({"request": name, "sent_by": who,
                        "server_cpu_ms": round(1000 * (after[0] - before[0]) / n, 1),
                        "latency_ms": round(1000 * wall / n, 1)})
    with contextlib.suppress(httpx.HTTPError):
        api.call("DELETE", f"/work_pools/{pool}")
    return out
