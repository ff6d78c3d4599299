"""Prefect's worker events: what a `prefect worker start` user's automations and event feed
see, read back from a real server; a down API never delays a run and drops are counted."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from flowhand.api.client import PrefectClient
from flowhand.api.models import Flow, FlowRun, WorkPool
from flowhand.events import WorkerEvents, slugify
from flowhand.metrics import Metrics
from tests import console
from tests.prefect_env import API, PrefectServer, engine_command

WORKER_EVENTS = ["prefect.worker.started", "prefect.worker.submitted-flow-run",
                 "prefect.worker.executed-flow-run", "prefect.worker.stopped"]


def read_events(api: API, resource_id: str, want: int, timeout: float = 60) -> list[dict[str, Any]]:
    """Events of one resource via POST /events/filter, once `want` of them are stored."""
    deadline = time.monotonic() + timeout
    while True:
        page = api.call("POST", "/events/filter", json={
            "filter": {"resource": {"id": [resource_id]}, "event": {"prefix": ["prefect.worker."]},
                       "order": "ASC"},
            "limit": 50})
        events: list[dict[str, Any]] = page["events"]
        if len(events) >= want or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def related(event: dict[str, Any], role: str) -> list[dict[str, str]]:
    return [r for r in event["related"] if r["prefect.resource.role"] == role]


def test_worker_events_are_readable_from_the_server(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """started, submitted-flow-run, executed-flow-run and stopped arrive with Prefect's names,
    worker resource, related deployment / flow / flow run / tags / pool, the infrastructure id
    and exit status, and `follows` links."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()},
                                tags=["team-a"])
    run = api.create_run(dep, tags=["nightly"])
    name = f"Events Worker {uuid.uuid4().hex[:6]}"
    env = console.base_env(tmp_path, PREFECT_API_URL=prefect_server.api_url,
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"))
    result = console.run("start", "-p", pool, "-n", name, "--run-once", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    resource_id = f"prefect.worker.process.{slugify(name)}"
    assert resource_id == f"prefect.worker.process.events-worker-{name[-6:]}"
    events = read_events(api, resource_id, 4)
    by_name = {e["event"]: e for e in events}
    assert sorted(by_name) == sorted(WORKER_EVENTS), [e["event"] for e in events]
    for event in events:
        assert event["resource"]["prefect.resource.name"] == name
        assert event["resource"]["prefect.worker-type"] == "process"
        assert related(event, "work-pool")[0]["prefect.resource.name"] == pool
    submitted, executed = by_name["prefect.worker.submitted-flow-run"], \
        by_name["prefect.worker.executed-flow-run"]
    flow_run = related(submitted, "flow-run")[0]
    assert flow_run["prefect.resource.id"] == f"prefect.flow-run.{run}"
    assert related(submitted, "deployment")[0]["prefect.resource.id"] == f"prefect.deployment.{dep}"
    assert related(submitted, "flow")[0]["prefect.resource.name"] == "test-flow"
    assert {r["prefect.resource.id"] for r in related(submitted, "tag")} == \
        {"prefect.tag.team-a", "prefect.tag.nightly"}
    ran = related(executed, "flow-run")[0]
    assert ran["prefect.infrastructure.status-code"] == "0"
    assert ran["prefect.infrastructure.identifier"] == api.flow_run(run)["infrastructure_pid"]
    assert executed["follows"] == submitted["id"]
    assert by_name["prefect.worker.stopped"]["follows"] == by_name["prefect.worker.started"]["id"]


def test_a_down_api_keeps_a_bounded_buffer_and_counts_drops(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the API is unreachable, emitting never waits, the buffer keeps the newest events
    up to its bound, drops are counted in the metric and said once; once the API is back the
    rest is delivered."""
    monkeypatch.setattr("flowhand.events.MAX_BUFFERED", 3)
    up = {"value": False}
    refused = {"count": 0}
    received: list[list[dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not up["value"]:
            refused["count"] += 1
            raise httpx.ConnectError("refused")
        received.append(httpx.Response(200, content=request.content).json())
        return httpx.Response(204)

    metrics = Metrics("p", "process")
    pool = WorkPool(id=uuid.uuid4(), name="p", type="process")

    async def read_flow(flow_run: FlowRun) -> Flow:
        return Flow(id=flow_run.flow_id, name="f")

    async def main() -> None:
        async with PrefectClient("http://127.0.0.1:9/api", transport=httpx.MockTransport(handler),
                                 max_retries=0) as client:
            events = WorkerEvents(client, "w", "process", metrics, read_flow, interval_seconds=0.05)
            async with anyio.create_task_group() as tg:
                tg.start_soon(events.run)
                started = time.monotonic()
                events.started(pool)
                for _ in range(5):
                    events.stopped()  # only the first after started counts
                    events.started(pool)
                # Emitting is synchronous: nothing here can wait for the (down) API.
                assert time.monotonic() - started < 1.0, "emitting never waits"
                with anyio.fail_after(30):
                    while refused["count"] < 3:  # a whole batch failed (two tries), and more
                        await anyio.sleep(0.05)
                up["value"] = True
                with anyio.fail_after(30):
                    while not received:
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    dropped = metrics.registry.get_sample_value("flowhand_events_dropped_total",
                                                {"pool": "p", "backend": "process"})
    assert dropped == 11 - 3
    assert [e["event"] for e in logs].count("events.dropping") == 1
    assert [e["event"] for e in logs].count("events.delayed") == 1
    assert sum(len(batch) for batch in received) == 3
    assert metrics.registry.get_sample_value("flowhand_events_sent_total",
                                             {"pool": "p", "backend": "process"}) == 3
