"""The in-memory Prefect API of the fast tests (httpx.MockTransport), with the orchestration
rules a worker meets: PENDING is aborted from PENDING/RUNNING/CANCELLING/CANCELLED, a repeated
transition id is a duplicate (REJECT, no state), `force` skips the rules, and `script` lets a
test answer one proposal its own way (WAIT, a lost connection, another worker's claim first).
`/flow_runs/filter` pages as Prefect's does (at most 200 a page, 422 above) and records each
body it is sent; `fail_filter_at_offset` makes one page fail.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from flowhand.backends.fake import FakeBackend

POOL = "fake-pool"
ACTIVE_PENDING_BLOCKERS = {"PENDING", "RUNNING", "CANCELLING", "CANCELLED"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def now() -> datetime:
    return datetime.now(UTC)


def state(kind: str, name: str | None = None, **details: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": kind, "name": name or kind.title(),
            "timestamp": now().isoformat(), "message": details.pop("message", None),
            "state_details": {k: str(v) if isinstance(v, uuid.UUID) else v
                              for k, v in details.items()}}


@dataclass
class FakeRun:
    id: uuid.UUID
    history: list[dict[str, Any]]
    labels: dict[str, str] = field(default_factory=dict)
    infrastructure_pid: str | None = None
    name: str | None = None

    @property
    def state(self) -> dict[str, Any]:
        return self.history[-1]

    def body(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name or f"run-{str(self.id)[:4]}",
                "flow_id": str(FLOW_ID),
                "deployment_id": None, "work_pool_name": POOL, "state": self.state,
                "labels": self.labels, "infrastructure_pid": self.infrastructure_pid,
                "run_count": 1, "next_scheduled_start_time": self.history[0]["timestamp"]}


FLOW_ID = uuid.UUID("00000000-0000-0000-0000-00000000f10f")
#: A test's answer to one proposal: return a response, or None to orchestrate as usual.
Script = Callable[[FakeRun, dict[str, Any]], httpx.Response | None]


class FakeAPI:
    """Holds runs and answers the requests a worker sends; records every request."""

    def __init__(self) -> None:
        self.runs: dict[uuid.UUID, FakeRun] = {}
        self.requests: list[tuple[str, str]] = []
        self.scripts: list[Script] = []
        self.workers: list[dict[str, Any]] = []
        self.down = False
        self.template = FakeBackend.default_base_job_template()
        #: Each `/flow_runs/filter` body, in order; the offset whose page answers 500.
        self.filter_bodies: list[dict[str, Any]] = []
        self.fail_filter_at_offset: int | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def add_run(self, kind: str = "SCHEDULED", run_name: str | None = None,
                **details: Any) -> FakeRun:
        run = FakeRun(uuid.uuid4(), [state(kind, **details)], name=run_name)
        self.runs[run.id] = run
        return run

    def pages(self) -> list[tuple[int, int]]:
        """(limit, offset) of each `/flow_runs/filter` request."""
        return [(b["limit"], b["offset"]) for b in self.filter_bodies]

    def set(self, run: FakeRun, kind: str, name: str | None = None, **details: Any) -> None:
        run.history.append(state(kind, name, **details))

    def types(self, run: FakeRun) -> list[str]:
        return [s["type"] for s in run.history]

    # -- the API -----------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api")
        self.requests.append((request.method, path))
        if self.down:
            raise httpx.ConnectError("the fake API is down", request=request)
        body = json.loads(request.content) if request.content else {}
        if path == "/flow_run_states/":
            run = self.runs.get(uuid.UUID(request.url.params["flow_run_id"]))
            return httpx.Response(200, json=run.history if run else [])
        for pattern, method, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                return handler(body, *match.groups())
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})

    def _routes(self) -> list[tuple[str, str, Callable[..., httpx.Response]]]:
        ok = lambda *_: httpx.Response(204)  # noqa: E731 - a table of tiny handlers
        return [
            (rf"/work_pools/{POOL}", "GET", lambda b: httpx.Response(200, json={
                "id": str(uuid.uuid4()), "name": POOL, "type": "process",
                "base_job_template": self.template})),
            (rf"/work_pools/{POOL}/workers/heartbeat", "POST", ok),
            (rf"/work_pools/{POOL}/workers/filter", "POST",
             lambda b: httpx.Response(200, json=self.workers)),
            (rf"/work_pools/{POOL}/get_scheduled_flow_runs", "POST", self._scheduled),
            (r"/flows/([^/]+)", "GET",
             lambda b, i: httpx.Response(200, json={"id": i, "name": "fake-flow"})),
            (r"/flow_runs/filter", "POST", self._filter),
            (r"/flow_runs/count", "POST", lambda b: httpx.Response(200, json=0)),
            (r"/flow_runs/([^/]+)", "GET", lambda b, i: self._run_response(i)),
            (r"/flow_runs/([^/]+)", "PATCH", self._patch),
            (r"/flow_runs/([^/]+)/labels", "PATCH", self._labels),
            (r"/flow_runs/([^/]+)/set_state", "POST", self._set_state),
            (r"/task_runs/filter", "POST", lambda b: httpx.Response(200, json=[])),
            (r"/logs/", "POST", lambda b: httpx.Response(201)),
            (r"/events", "POST", ok),
        ]

    def _run_response(self, run_id: str) -> httpx.Response:
        run = self.runs.get(uuid.UUID(run_id))
        if run is None:
            return httpx.Response(404, json={"detail": "Flow run not found"})
        return httpx.Response(200, json=run.body())

    def _scheduled(self, body: dict[str, Any]) -> httpx.Response:
        due = [r for r in self.runs.values() if r.state["type"] == "SCHEDULED"]
        return httpx.Response(200, json=[
            {"work_pool_id": str(uuid.uuid4()), "work_queue_id": str(uuid.uuid4()),
             "flow_run": r.body()} for r in due[: body.get("limit", 200)]])

    def _filter(self, body: dict[str, Any]) -> httpx.Response:
        self.filter_bodies.append(body)
        if body.get("limit", 200) > 200:
            return httpx.Response(422, json={"detail": "limit above 200"})
        if body.get("offset", 0) == self.fail_filter_at_offset:
            return httpx.Response(500, json={"detail": "injected"})
        kinds = body.get("flow_runs", {}).get("state", {}).get("type", {}).get("any_")
        ids = body.get("flow_runs", {}).get("id", {}).get("any_")
        found = [r.body() for r in self.runs.values()
                 if (kinds is None or r.state["type"] in kinds)
                 and (ids is None or str(r.id) in ids)]
        offset, limit = body.get("offset", 0), body.get("limit", 200)
        return httpx.Response(200, json=found[offset:offset + limit])

    def _patch(self, body: dict[str, Any], run_id: str) -> httpx.Response:
        self.runs[uuid.UUID(run_id)].infrastructure_pid = body.get("infrastructure_pid")
        return httpx.Response(204)

    def _labels(self, body: dict[str, Any], run_id: str) -> httpx.Response:
        self.runs[uuid.UUID(run_id)].labels.update(body)
        return httpx.Response(204)

    def _set_state(self, body: dict[str, Any], run_id: str) -> httpx.Response:
        run = self.runs.get(uuid.UUID(run_id))
        if run is None:
            return httpx.Response(404, json={"detail": "Flow run not found"})
        for script in list(self.scripts):
            answer = script(run, body)
            if answer is not None:
                return answer
        proposed = body["state"]
        details = proposed.get("state_details") or {}
        current = run.state
        if not body.get("force"):
            tid = details.get("transition_id")
            if tid and tid == current["state_details"].get("transition_id"):
                return result("REJECT", None, "This run has already made this state transition.")
            if proposed["type"] == "PENDING" and current["type"] in ACTIVE_PENDING_BLOCKERS:
                return result("ABORT", current, "This run is in a PENDING state and cannot "
                              "transition to a PENDING state.")
        new = state(proposed["type"], proposed.get("name"), message=proposed.get("message"),
                    **details)
        run.history.append(new)
        return result("ACCEPT", new)


def result(status: str, new_state: dict[str, Any] | None, reason: str | None = None,
           **details: Any) -> httpx.Response:
    return httpx.Response(201 if status == "ACCEPT" else 200, json={
        "status": status, "state": new_state, "details": {"reason": reason, **details}})


def in_seconds(seconds: float) -> str:
    return (now() + timedelta(seconds=seconds)).isoformat()
