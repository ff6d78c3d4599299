"""Fault injection between the worker and a real Prefect server: the worker neither crashes
nor loses a run when the API answers 503, times out, returns garbage or says ABORT/REJECT/WAIT."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import structlog

from flowhand.api.client import PrefectClient
from flowhand.config import Config
from tests.helpers import FaultProxy, make_worker, serve
from tests.prefect_env import API, engine_command


def is_claim(request: httpx.Request) -> bool:
    return (request.url.path.endswith("/set_state")
            and json.loads(request.content)["state"]["type"] == "PENDING")


def is_poll(request: httpx.Request) -> bool:
    return request.url.path.endswith("/get_scheduled_flow_runs")


def orchestration(status: str, state: dict[str, Any] | None = None, **details: Any) -> bytes:
    kind = {"ABORT": "abort_details", "REJECT": "reject_details", "WAIT": "wait_details"}[status]
    return json.dumps({"status": status, "state": state,
                       "details": {"type": kind, "reason": "injected", **details}}).encode()


def run_with(config: Config, proxy: FaultProxy, *, serve_until: Callable[[], bool] | None = None,
             timeout: float = 60) -> list[dict[str, Any]]:
    """One run-once pass, or a served loop stopped when `serve_until()` holds."""
    until = None if serve_until is None else (lambda _worker: serve_until())
    return serve(config, until, timeout=timeout, transport=proxy, max_retries=2,
                 retry_base_seconds=0.02, retry_max_seconds=0.1)


def setup_run(api: API, **job_variables: Any) -> tuple[str, str]:
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command(), **job_variables})
    return pool, api.create_run(dep)


def test_503_then_success_completes_the_run(api: API, make_config: Callable[..., Config]) -> None:
    """503s (with and without Retry-After) on poll and claim are retried; the run completes."""
    pool, run = setup_run(api)
    failures = Counter[str]()

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        kind = "poll" if is_poll(request) else "claim" if is_claim(request) else None
        if kind and failures[kind] < 2:
            failures[kind] += 1
            return httpx.Response(503, headers={"Retry-After": "0"} if kind == "claim" else {},
                                  json={"detail": "database is locked"})
        return await forward()

    proxy = FaultProxy(handler)
    run_with(make_config(pool), proxy)
    assert api.state(run)["type"] == "COMPLETED"
    assert failures == {"poll": 2, "claim": 2}
    assert proxy.calls[f"POST /work_pools/{pool}/get_scheduled_flow_runs"] == 3


def test_claim_whose_answer_was_lost_is_recognised_as_ours(
    api: API, make_config: Callable[..., Config]
) -> None:
    """A claim written by the server whose answer never arrived is retried with the same
    transition id and recognised as ours: the run runs once, and is not left PENDING."""
    pool, run = setup_run(api)
    lost = []

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if is_claim(request) and not lost:
            await forward()  # the server applies the claim ...
            lost.append(json.loads(request.content)["state"]["state_details"]["transition_id"])
            raise httpx.ReadTimeout("injected: answer lost", request=request)  # ... we never hear
        return await forward()

    logs = run_with(make_config(pool), FaultProxy(handler))
    assert api.state(run)["type"] == "COMPLETED"
    pendings = [s for s in api.history(run) if s["type"] == "PENDING"]
    assert len(pendings) == 1 and pendings[0]["state_details"]["transition_id"] == lost[0]
    assert [e["outcome"] for e in logs if e["event"] == "flow_run.claimed"] in (
        ["ACCEPT"], ["DUPLICATE"], ["READ_BACK"])


def test_abort_and_reject_answers_leave_the_run_for_later(
    api: API, make_config: Callable[..., Config]
) -> None:
    """ABORT or REJECT to a claim means not ours: nothing starts, the slot is freed, and a
    later pass runs the run."""
    for answer in (orchestration("ABORT"),
                   orchestration("REJECT", {"type": "SCHEDULED", "name": "AwaitingConcurrencySlot"})):
        pool, run = setup_run(api)

        async def handler(request: httpx.Request, forward: Any, answer: bytes = answer
                          ) -> httpx.Response:
            if is_claim(request):
                return httpx.Response(200, content=answer)
            return await forward()

        logs = run_with(make_config(pool, limit=1), FaultProxy(handler))
        assert api.state(run)["type"] == "SCHEDULED"
        assert not [e for e in logs if e["event"] == "flow_run.started"]
        refused = [e for e in logs if e["event"] in ("flow_run.claim_aborted",
                                                     "flow_run.claim_rejected")]
        assert refused and refused[0]["reason"] == "injected"

        async def passthrough(request: httpx.Request, forward: Any) -> httpx.Response:
            return await forward()

        run_with(make_config(pool, limit=1), FaultProxy(passthrough))
        assert api.state(run)["type"] == "COMPLETED"


def test_wait_answer_is_honoured_then_the_claim_proceeds(
    api: API, make_config: Callable[..., Config]
) -> None:
    """WAIT makes the worker wait the given delay and propose again; the run then completes."""
    pool, run = setup_run(api)
    waited = []

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if is_claim(request) and not waited:
            waited.append(1)
            return httpx.Response(200, content=orchestration("WAIT", delay_seconds=0.3))
        return await forward()

    logs = run_with(make_config(pool), FaultProxy(handler))
    assert api.state(run)["type"] == "COMPLETED"
    assert [e["delay_seconds"] for e in logs if e["event"] == "flow_run.claim_wait"] == [0.3]


def test_garbage_bodies_and_timeouts_do_not_stop_the_loop(
    api: API, make_config: Callable[..., Config]
) -> None:
    """Garbage poll bodies and timeouts beyond the retries are logged and survived; the served
    loop recovers and completes the run."""
    pool, run = setup_run(api)
    faults = iter([
        httpx.Response(200, content=b"<html>proxy error</html>"),
        httpx.Response(200, json=[{"unexpected": True}]),
        httpx.ConnectTimeout("injected"), httpx.ConnectTimeout("injected"),
        httpx.ConnectTimeout("injected"),
    ])

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if is_poll(request):
            fault = next(faults, None)
            if isinstance(fault, Exception):
                raise fault
            if fault is not None:
                return fault
        return await forward()

    logs = run_with(make_config(pool), FaultProxy(handler),
                    serve_until=lambda: api.state(run)["type"] == "COMPLETED")
    failed = [e["error"] for e in logs if e["event"] == "poll.failed"]
    assert len(failed) == 3
    assert "unexpected body" in failed[0] and "unexpected body" in failed[1]
    assert "ConnectTimeout" in failed[2]
    assert [e for e in logs if e["event"] == "poll.recovered"]


def test_deployment_gone_at_claim_time_cancels_the_run(
    api: API, make_config: Callable[..., Config]
) -> None:
    """A run whose deployment is gone (404) is cancelled with Prefect's message, not started."""
    pool, run = setup_run(api)
    dep = api.flow_run(run)["deployment_id"]

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith(f"/deployments/{dep}"):
            return httpx.Response(404, json={"detail": "Deployment not found."})
        return await forward()

    run_with(make_config(pool), FaultProxy(handler))
    state = api.state(run)
    assert state["type"] == "CANCELLED"
    assert state["message"] == f"Deployment {dep} no longer exists, cancelled run."


def test_api_down_for_the_crash_report_then_back(
    api: API, make_config: Callable[..., Config]
) -> None:
    """A crash report that meets 503s is retried until the server takes it: never left RUNNING."""
    pool, run = setup_run(api, command=engine_command("--state", "none", "--exit", "4"))
    failures = []

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if request.url.path.endswith("/set_state") and b"CRASHED" in request.content \
                and len(failures) < 2:
            failures.append(1)
            return httpx.Response(503)
        return await forward()

    run_with(make_config(pool), FaultProxy(handler))
    assert api.state(run)["type"] == "CRASHED"
    assert len(failures) == 2


def test_auth_errors_are_loud_and_mark_the_worker_unhealthy(
    api: API, make_config: Callable[..., Config]
) -> None:
    """A 401 during polling is logged as an error naming the credentials and marks the worker
    unhealthy; it is not retried silently, and the loop recovers when the API accepts us again."""
    pool, run = setup_run(api)
    refusals = []

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if is_poll(request) and len(refusals) < 2:
            refusals.append(1)
            return httpx.Response(401, json={"detail": "Unauthorized"})
        return await forward()

    reasons: list[str | None] = []
    config = make_config(pool)

    async def main() -> None:
        async with PrefectClient(config.api.url, transport=FaultProxy(handler),
                                 retry_base_seconds=0.02) as client:
            worker = make_worker(config, client)

            async def watch() -> None:
                while api.state(run)["type"] != "COMPLETED":
                    reasons.append(worker.unhealthy_reason)
                    await anyio.sleep(0.05)
                worker.stop()

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await worker.run()
            reasons.append(worker.unhealthy_reason)

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    failed = [e for e in logs if e["event"] == "poll.failed"]
    assert len(failed) == 2 and all(e["log_level"] == "error" for e in failed)
    assert "PREFECT_API_KEY" in failed[0]["error"]
    assert any(r and "refused a request" in r for r in reasons)
    assert reasons[-1] is None


def test_claim_that_reopens_a_finished_run_is_undone(
    api: API, make_config: Callable[..., Config], tmp_path: Any
) -> None:
    """If another worker claims, runs and finishes a run between our poll and our claim, the
    server accepts our PENDING from COMPLETED; flowhand sees it in the history, puts COMPLETED
    back and does not run the flow again."""
    marks = tmp_path / "marks"
    marks.mkdir()
    pool, run = setup_run(api, command=engine_command("--mark", str(marks)))
    raced = []

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if is_claim(request) and not raced:
            raced.append(1)

            def other_worker_runs_it() -> None:
                for state in ("PENDING", "RUNNING", "COMPLETED"):
                    api.call("POST", f"/flow_runs/{run}/set_state",
                             json={"state": {"type": state}, "force": True})

            await anyio.to_thread.run_sync(other_worker_runs_it)
        return await forward()

    logs = run_with(make_config(pool), FaultProxy(handler))
    assert api.state(run)["type"] == "COMPLETED"
    assert not list(marks.iterdir()), "the flow did not run a second time"
    assert [e["restored"] for e in logs if e["event"] == "flow_run.claim_undone"] == ["COMPLETED"]


def test_a_burst_reads_its_deployment_and_flow_once(
    api: API, make_config: Callable[..., Config]
) -> None:
    """Eight runs of one deployment, claimed in one poll, read the deployment and the flow once,
    send no read of the run before the claim, and per run only the claim, the history check,
    labels and the infrastructure pid; the final reads of runs ending together are batched."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    runs = [api.create_run(dep) for _ in range(8)]

    read_back: list[str] = []
    answered = Counter[str]()  # successful answers (SQLite answers some requests 503)

    async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
        if request.url.path.endswith("/flow_runs/filter"):
            ids = json.loads(request.content)["flow_runs"].get("id", {}).get("any_", [])
            read_back.extend(ids)
        response = await forward()
        if response.is_success:
            answered[f"{request.method} {request.url.path.split('/api', 1)[1]}"] += 1
        return response

    proxy = FaultProxy(handler)
    run_with(make_config(pool), proxy)
    assert {api.state(r)["type"] for r in runs} == {"COMPLETED"}
    # Kinds of request per run (SQLite answers some writes 503 and they are retried).
    per_run: dict[str, set[str]] = {run: set() for run in runs}
    for call in proxy.calls:
        method, path = call.split(" ", 1)
        parts = path.strip("/").split("/")
        if parts[0] == "flow_runs" and len(parts) > 1 and parts[1] in runs:
            per_run[parts[1]].add(" ".join([method, "flow_runs", *parts[2:]]))
    assert answered[f"GET /deployments/{dep}"] == 1
    assert sum(n for c, n in answered.items() if c.startswith("GET /flows/")) == 1
    expected = {
        "POST flow_runs set_state",  # the claim
        "PATCH flow_runs labels",
        "PATCH flow_runs",           # infrastructure_pid
    }
    assert all(kinds == expected for kinds in per_run.values()), per_run
    assert sum(n for c, n in proxy.calls.items() if c.startswith("GET /flow_run_states")) >= 8
    # The final reads ride on filter requests by id (shared by the runs that end together).
    assert sorted(read_back) == sorted(runs)
