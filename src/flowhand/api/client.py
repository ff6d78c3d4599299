"""An async client for the parts of the Prefect REST API a worker uses.

Every request carries the headers Prefect's server expects. Transport errors and the statuses
Prefect itself treats as transient are retried with capped exponential backoff and jitter, honouring
`Retry-After`. A state proposal keeps one `transition_id` across those retries, so a proposal that
reached the server before the connection dropped is recognised as ours when it is sent again.
"""

from __future__ import annotations

import base64
import email.utils
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import httpx
import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError

from flowhand import PREFECT_API_VERSION, PREFECT_COMPAT_VERSION, __version__
from flowhand.api.models import (
    Deployment,
    Flow,
    FlowRun,
    LogRecord,
    OrchestrationResult,
    State,
    StateType,
    WorkerFlowRunResponse,
    WorkPool,
    WorkQueue,
)
from flowhand.errors import (
    APIResponseError,
    APIStatusError,
    APIUnreachable,
    AuthError,
    Conflict,
    NotFound,
)

log = structlog.get_logger("flowhand.api")

M = TypeVar("M", bound=BaseModel)

#: Statuses that mean "try again later": request timeout, rate limit, bad gateway, unavailable
#: (SQLite's "database is locked" arrives as 503), gateway timeout.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})

#: The User-Agent must match the server's `^prefect/<version> (API <v>)$`: the server reads the
#: client version from it to pick orchestration rules. A local-version suffix keeps it parseable
#: while saying who we are.
USER_AGENT = f"prefect/{PREFECT_COMPAT_VERSION}+flowhand.{__version__} (API {PREFECT_API_VERSION})"


def auth_header(api_key: str | None, auth_string: str | None) -> dict[str, str]:
    """The Authorization header Prefect clients send; the auth string wins when both are set."""
    if auth_string:
        token = base64.b64encode(auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries spread out."""
    delay = min(cap, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def _tls_verification(api_url: str) -> bool:
    """Whether httpx must build a TLS context (some 40 ms of start-up, loading CA files).

    A plain-HTTP API reached without a proxy never uses TLS (redirects are not followed), so
    it gets none; everything else verifies certificates as usual.
    """
    proxied = any(os.environ.get(name) or os.environ.get(name.lower())
                  for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    return proxied or not api_url.lower().startswith("http://")


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
        headers = {
            "User-Agent": USER_AGENT,
            "X-PREFECT-API-VERSION": PREFECT_API_VERSION,
            **auth_header(api_key, auth_string),
        }
        if worker_name:
            headers["X-Prefect-Worker-Name"] = worker_name
        self.api_url = api_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers=headers,
            timeout=timeout_seconds,
            transport=transport,
            verify=_tls_verification(self.api_url),
            # Every connection is kept: a new one costs the server more than the request.
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
        )
        # Requests beyond the limit wait here, in order, rather than in httpx's pool, whose
        # bookkeeping grows with every waiting request (a burst of claims is hundreds).
        self._slots = anyio.CapacityLimiter(max_connections)
        self.max_retries = max_retries
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._sleep = sleep
        #: Monotonic time of the last answer of any kind from the server (for readiness).
        self.last_answer_at: float | None = None

    async def __aenter__(self) -> PrefectClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- transport ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send one logical request, retrying transient failures (up to `retries`, default
        `max_retries`); raise on any other error."""
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        url = path.lstrip("/")
        while True:
            try:
                async with self._slots:
                    response = await self._http.request(method, url, json=json, params=params)
            except httpx.TransportError as exc:
                if attempt >= max_retries:
                    raise APIUnreachable(
                        f"{method} {path}: {type(exc).__name__}: {exc or 'no detail'} "
                        f"(after {attempt + 1} attempts; is PREFECT_API_URL {self.api_url} right?)"
                    ) from exc
                delay = backoff_seconds(attempt, self.retry_base_seconds, self.retry_max_seconds)
                log.debug("api.retry", method=method, path=path, error=type(exc).__name__,
                          attempt=attempt + 1, delay_seconds=round(delay, 3))
                attempt += 1
                await self._sleep(delay)
                continue

            self.last_answer_at = time.monotonic()
            if response.headers.get("Prefect-Maintenance", "").lower() == "true":
                # Prefect's own client waits out maintenance windows without counting tries.
                delay = _retry_after_seconds(response) or self.retry_max_seconds
                log.info("api.maintenance", method=method, path=path, delay_seconds=delay)
                await self._sleep(delay)
                continue
            if response.status_code in RETRY_STATUSES:
                if attempt >= max_retries:
                    raise APIUnreachable(
                        f"{method} {path} answered {response.status_code} "
                        f"after {attempt + 1} attempts: {_detail(response)}"
                    )
                retry_after = _retry_after_seconds(response)
                delay = (
                    min(retry_after, 60.0)
                    if retry_after is not None
                    else backoff_seconds(attempt, self.retry_base_seconds, self.retry_max_seconds)
                )
                log.debug("api.retry", method=method, path=path, status=response.status_code,
                          attempt=attempt + 1, delay_seconds=round(delay, 3))
                attempt += 1
                await self._sleep(delay)
                continue
            if response.status_code >= 400:
                raise self._status_error(method, path, response)
            return response

    @staticmethod
    def _status_error(method: str, path: str, response: httpx.Response) -> APIStatusError:
        code = response.status_code
        cls: type[APIStatusError] = APIStatusError
        if code == 404:
            cls = NotFound
        elif code == 409:
            cls = Conflict
        elif code in (401, 403):
            cls = AuthError
        return cls(code, method, path, _detail(response))

    @staticmethod
    def _parse(model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise APIResponseError(
                f"{response.request.method} {response.request.url.path}: unexpected body for "
                f"{model.__name__} ({exc.error_count()} errors): {response.text[:200]!r}"
            ) from exc

    @staticmethod
    def _parse_list(model: type[M], response: httpx.Response) -> list[M]:
        try:
            return TypeAdapter(list[model]).validate_json(response.content)  # type: ignore[valid-type]
        except ValidationError as exc:
            raise APIResponseError(
                f"{response.request.method} {response.request.url.path}: unexpected body for "
                f"list[{model.__name__}] ({exc.error_count()} errors): {response.text[:200]!r}"
            ) from exc

    # -- work pools ---------------------------------------------------------------------------

    async def read_work_pool(self, name: str) -> WorkPool:
        return self._parse(WorkPool, await self.request("GET", f"/work_pools/{name}"))

    async def create_work_pool(
        self, name: str, type: str, base_job_template: dict[str, Any]
    ) -> WorkPool:
        body = {"name": name, "type": type, "base_job_template": base_job_template}
        return self._parse(WorkPool, await self.request("POST", "/work_pools/", json=body))

    async def update_work_pool_template(self, name: str, base_job_template: dict[str, Any]) -> None:
        await self.request(
            "PATCH", f"/work_pools/{name}", json={"base_job_template": base_job_template}
        )

    async def read_work_queue(self, pool: str, queue: str) -> WorkQueue:
        response = await self.request("GET", f"/work_pools/{pool}/queues/{queue}")
        return self._parse(WorkQueue, response)

    async def send_heartbeat(self, pool: str, worker_name: str, interval_seconds: float) -> None:
        await self.request(
            "POST",
            f"/work_pools/{pool}/workers/heartbeat",
            json={"name": worker_name, "heartbeat_interval_seconds": int(interval_seconds)},
        )

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
        return self._parse_list(WorkerFlowRunResponse, response)

    # -- deployments, flows, variables, blocks ------------------------------------------------

    async def read_deployment(self, deployment_id: uuid.UUID) -> Deployment:
        return self._parse(Deployment, await self.request("GET", f"/deployments/{deployment_id}"))

    async def read_flow(self, flow_id: uuid.UUID) -> Flow:
        return self._parse(Flow, await self.request("GET", f"/flows/{flow_id}"))

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
        return self._parse(FlowRun, await self.request("GET", f"/flow_runs/{flow_run_id}"))

    async def read_flow_run_states(self, flow_run_id: uuid.UUID) -> list[State]:
        """The run's state history, oldest first."""
        response = await self.request(
            "GET", "/flow_run_states/", params={"flow_run_id": str(flow_run_id)}
        )
        states = self._parse_list(State, response)
        return sorted(states, key=lambda s: s.timestamp or datetime.min.replace(tzinfo=UTC))

    async def read_flow_runs(self, filter_body: dict[str, Any]) -> list[FlowRun]:
        return self._parse_list(
            FlowRun, await self.request("POST", "/flow_runs/filter", json=filter_body)
        )

    async def count_flow_runs(self, filter_body: dict[str, Any]) -> int:
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
        return self._parse(OrchestrationResult, response)

    async def set_infrastructure_pid(self, flow_run_id: uuid.UUID, infrastructure_pid: str) -> None:
        await self.request(
            "PATCH", f"/flow_runs/{flow_run_id}", json={"infrastructure_pid": infrastructure_pid}
        )

    async def update_flow_run_labels(self, flow_run_id: uuid.UUID, labels: dict[str, str]) -> None:
        await self.request("PATCH", f"/flow_runs/{flow_run_id}/labels", json=labels)

    async def create_logs(self, records: Sequence[LogRecord]) -> None:
        if records:
            await self.request(
                "POST", "/logs/", json=[r.model_dump(mode="json") for r in records]
            )
