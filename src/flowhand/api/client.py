"""An async client for the parts of the Prefect REST API a worker uses: one method per endpoint.

Sending, headers and retries are `flowhand.api.transport`'s; request bodies for the filter
endpoints come from `flowhand.api.filters`, and longer results are paged with
`flowhand.api.pagination`. A state proposal keeps one `transition_id` across the transport's
retries, so a proposal that reached the server before the connection dropped is recognised as
ours when it is sent again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx

from flowhand.api.models import (
    Deployment,
    Flow,
    FlowRun,
    LogRecord,
    OrchestrationResult,
    PoolWorker,
    State,
    StateType,
    TaskRun,
    WorkerFlowRunResponse,
    WorkPool,
    WorkQueue,
)
from flowhand.api.responses import parse_list, parse_model
from flowhand.api.transport import APITransport, prefect_headers
from flowhand.errors import APIResponseError

__all__ = ["PrefectClient"]

#: A body from `flowhand.api.filters`.
FilterBody = dict[str, Any]


class PrefectClient:
    """The worker's view of the Prefect API.

    Use as an async context manager. `transport` lets tests inject faults with
    `httpx.MockTransport`; `sleep` lets them skip the backoff waits.
    """

    def __init__(
        self,
        api_url: str,
        *,
        api_key: str | None = None,
        auth_string: str | None = None,
        worker_name: str | None = None,
        timeout_seconds: float = 30.0,
        max_retries: int = 5,
        max_connections: int = 16,
        retry_base_seconds: float = 0.5,
        retry_max_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.transport = APITransport(
            api_url,
            headers=prefect_headers(api_key, auth_string, worker_name),
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            max_connections=max_connections,
            retry_base_seconds=retry_base_seconds,
            retry_max_seconds=retry_max_seconds,
            transport=transport,
            sleep=sleep,
        )
        self.api_url = self.transport.api_url

    @property
    def last_answer_at(self) -> float | None:
        """Monotonic time of the last answer of any kind from the server (for readiness)."""
        return self.transport.last_answer_at

    async def __aenter__(self) -> PrefectClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send one request with the transport's retries (for endpoints not covered here)."""
        return await self.transport.request(method, path, json=json, params=params,
                                            retries=retries)

    # -- work pools ---------------------------------------------------------------------------

    async def read_work_pool(self, name: str) -> WorkPool:
        return parse_model(WorkPool, await self.request("GET", f"/work_pools/{name}"))

    async def create_work_pool(
        self, name: str, type: str, base_job_template: dict[str, Any]
    ) -> WorkPool:
        body = {"name": name, "type": type, "base_job_template": base_job_template}
        return parse_model(WorkPool, await self.request("POST", "/work_pools/", json=body))

    async def update_work_pool_template(self, name: str, base_job_template: dict[str, Any]) -> None:
        await self.request(
            "PATCH", f"/work_pools/{name}", json={"base_job_template": base_job_template}
        )

    async def read_work_queue(self, pool: str, queue: str) -> WorkQueue:
        response = await self.request("GET", f"/work_pools/{pool}/queues/{queue}")
        return parse_model(WorkQueue, response)

    async def send_heartbeat(self, pool: str, worker_name: str, interval_seconds: float) -> None:
        await self.request(
            "POST",
            f"/work_pools/{pool}/workers/heartbeat",
            json={"name": worker_name, "heartbeat_interval_seconds": int(interval_seconds)},
        )

    async def read_workers(self, pool: str) -> list[PoolWorker]:
        """The pool's workers with their status and last heartbeat."""
        response = await self.request("POST", f"/work_pools/{pool}/workers/filter",
                                      json={"limit": 200})
        return parse_list(PoolWorker, response)

    async def get_scheduled_flow_runs(
        self,
        pool: str,
        *,
        work_queue_names: Sequence[str],
        scheduled_before: datetime,
        scheduled_after: datetime | None = None,
        limit: int | None = None,
    ) -> list[WorkerFlowRunResponse]:
        body: dict[str, Any] = {
            "work_queue_names": list(work_queue_names),
            "scheduled_before": scheduled_before.isoformat(),
        }
        if scheduled_after is not None:
            body["scheduled_after"] = scheduled_after.isoformat()
        if limit is not None:
            body["limit"] = limit
        response = await self.request(
            "POST", f"/work_pools/{pool}/get_scheduled_flow_runs", json=body
        )
        return parse_list(WorkerFlowRunResponse, response)

    # -- deployments, flows, variables, blocks ------------------------------------------------

    async def read_deployment(self, deployment_id: uuid.UUID) -> Deployment:
        return parse_model(Deployment, await self.request("GET", f"/deployments/{deployment_id}"))

    async def read_flow(self, flow_id: uuid.UUID) -> Flow:
        return parse_model(Flow, await self.request("GET", f"/flows/{flow_id}"))

    async def read_variable_value(self, name: str) -> Any:
        response = await self.request("GET", f"/variables/name/{name}")
        try:
            return response.json()["value"]
        except (ValueError, KeyError, TypeError) as exc:
            raise APIResponseError(f"variable {name!r}: unexpected body") from exc

    async def read_block_data(self, type_slug: str, name: str) -> dict[str, Any]:
        response = await self.request(
            "GET",
            f"/block_types/slug/{type_slug}/block_documents/name/{name}",
            params={"include_secrets": "true"},
        )
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise APIResponseError(f"block {type_slug}/{name}: unexpected body") from exc
        if not isinstance(data, dict):
            raise APIResponseError(f"block {type_slug}/{name}: data is not an object")
        return data

    # -- flow runs ----------------------------------------------------------------------------

    async def read_flow_run(self, flow_run_id: uuid.UUID) -> FlowRun:
        return parse_model(FlowRun, await self.request("GET", f"/flow_runs/{flow_run_id}"))

    async def read_flow_run_document(self, flow_run_id: uuid.UUID) -> dict[str, Any]:
        """The run as the API returns it, unparsed: what Prefect's flow hooks are handed."""
        response = await self.request("GET", f"/flow_runs/{flow_run_id}")
        try:
            body = response.json()
        except ValueError as exc:
            raise APIResponseError(f"flow run {flow_run_id}: unexpected body") from exc
        if not isinstance(body, dict):
            raise APIResponseError(f"flow run {flow_run_id}: not an object")
        return body

    async def read_flow_run_states(self, flow_run_id: uuid.UUID) -> list[State]:
        """The run's state history, oldest first."""
        response = await self.request(
            "GET", "/flow_run_states/", params={"flow_run_id": str(flow_run_id)}
        )
        states = parse_list(State, response)
        return sorted(states, key=lambda s: s.timestamp or datetime.min.replace(tzinfo=UTC))

    async def read_flow_runs(self, filter_body: FilterBody) -> list[FlowRun]:
        """One page of `POST /flow_runs/filter`; the body is a `FlowRunFilter(...).body()`."""
        return parse_list(
            FlowRun, await self.request("POST", "/flow_runs/filter", json=filter_body)
        )

    async def count_flow_runs(self, filter_body: FilterBody) -> int:
        response = await self.request("POST", "/flow_runs/count", json=filter_body)
        try:
            return int(response.json())
        except (ValueError, TypeError) as exc:
            raise APIResponseError(f"/flow_runs/count: unexpected body {response.text[:100]!r}") \
                from exc

    async def set_flow_run_state(
        self,
        flow_run_id: uuid.UUID,
        state_type: StateType,
        *,
        name: str | None = None,
        message: str | None = None,
        scheduled_time: datetime | None = None,
        force: bool = False,
        transition_id: uuid.UUID | None = None,
    ) -> OrchestrationResult:
        """Propose a state. The transition id is kept across HTTP retries of this proposal."""
        details: dict[str, Any] = {
            "flow_run_id": str(flow_run_id),
            "transition_id": str(transition_id or uuid.uuid4()),
        }
        if scheduled_time is not None:
            details["scheduled_time"] = scheduled_time.isoformat()
        state: dict[str, Any] = {
            "type": state_type.value,
            "message": message,
            "state_details": details,
        }
        if name is not None:
            state["name"] = name
        response = await self.request(
            "POST", f"/flow_runs/{flow_run_id}/set_state", json={"state": state, "force": force}
        )
        return parse_model(OrchestrationResult, response)

    async def set_infrastructure_pid(self, flow_run_id: uuid.UUID, infrastructure_pid: str) -> None:
        await self.request(
            "PATCH", f"/flow_runs/{flow_run_id}", json={"infrastructure_pid": infrastructure_pid}
        )

    async def update_flow_run_labels(self, flow_run_id: uuid.UUID, labels: dict[str, str]) -> None:
        await self.request("PATCH", f"/flow_runs/{flow_run_id}/labels", json=labels)

    # -- task runs ----------------------------------------------------------------------------

    async def read_task_runs(self, filter_body: FilterBody) -> list[TaskRun]:
        """One page of `POST /task_runs/filter`; the body is a `TaskRunFilter(...).body()`."""
        return parse_list(
            TaskRun, await self.request("POST", "/task_runs/filter", json=filter_body)
        )

    async def set_task_run_state(
        self, task_run_id: uuid.UUID, state_type: StateType, message: str, *, force: bool = False
    ) -> None:
        await self.request(
            "POST", f"/task_runs/{task_run_id}/set_state",
            json={"state": {"type": state_type.value, "message": message}, "force": force},
        )

    # -- logs ---------------------------------------------------------------------------------

    async def create_logs(self, records: Sequence[LogRecord]) -> None:
        if records:
            await self.request(
                "POST", "/logs/", json=[r.model_dump(mode="json") for r in records]
            )
