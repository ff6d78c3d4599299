"""Prefect's worker events: started, stopped, submitted-flow-run, executed-flow-run.

Same names, resources and related resources as Prefect's worker (prefect/workers/base.py), so
automations and the UI's event feed treat flowhand like `prefect worker start`:

- resource: `prefect.worker.<type>.<slug of the worker name>`, with its name, the Prefect
  version it speaks and `prefect.worker-type`;
- related: the run's deployment, flow and flow run, their tags, and the work pool;
  `executed-flow-run` adds the infrastructure id and exit status to the flow-run resource and
  `follows` the submitted event (as `stopped` follows `started`).

Events are queued without waiting and sent in batches by a background task to `POST /events`,
the HTTP endpoint Prefect's server offers beside the websocket its own client uses: one request
per batch, and nothing to keep open. While the API is unreachable a bounded buffer keeps the
newest events; what is dropped is counted (`flowhand_events_dropped_total`) and said once.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from flowhand import PREFECT_COMPAT_VERSION, __version__
from flowhand.api.client import PrefectClient
from flowhand.api.models import Flow, FlowRun, WorkPool
from flowhand.api.retry import backoff_seconds
from flowhand.backends.base import Job
from flowhand.clock import utcnow
from flowhand.errors import APIError, APIStatusError, AuthError

log = structlog.get_logger("flowhand.events")

#: Events kept while the API cannot take them; the oldest are dropped beyond this.
MAX_BUFFERED = 5_000
BATCH = 200

Resource = dict[str, str]


def slugify(text: str) -> str:
    """Lower-case ASCII words joined by '-', as python-slugify (which Prefect uses) makes them."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    ascii_text = re.sub(r"['\"]+", "", ascii_text.lower())
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


def _related(kind: str, id_: Any, name: str) -> Resource:
    return {"prefect.resource.id": f"prefect.{kind}.{id_}", "prefect.resource.role": kind,
            "prefect.resource.name": name}


class WorkerEvents:
    """Builds the worker's events and sends them in the background."""

    def __init__(
        self,
        client: PrefectClient,
        worker_name: str,
        worker_type: str,
        metrics: Any,
        read_flow: Callable[[FlowRun], Awaitable[Flow]],
        interval_seconds: float = 1.0,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.read_flow = read_flow
        self.interval = interval_seconds
        self.resource: Resource = {
            "prefect.resource.id": f"prefect.worker.{worker_type}.{slugify(worker_name)}",
            "prefect.resource.name": worker_name,
            "prefect.version": PREFECT_COMPAT_VERSION,
            "prefect.worker-type": worker_type,
            "flowhand.version": __version__,
        }
        self.pool: Resource | None = None
        self._buffer: deque[dict[str, Any]] = deque()
        self._wake = anyio.Event()
        self._started_id: str | None = None
        #: Submitted events by flow run: (event id, related resources) for executed-flow-run.
        self._submitted: dict[uuid.UUID, tuple[str, list[Resource]]] = {}
        self._failing = False
        self._said_dropping = False

    # -- the events -------------------------------------------------------------------------

    def started(self, pool: WorkPool | None) -> None:
        if pool is not None:
            self.pool = _related("work-pool", pool.id, pool.name)
        self._started_id = self._emit("prefect.worker.started", self._with_pool([]))

    def stopped(self) -> None:
        if self._started_id is not None:
            self._emit("prefect.worker.stopped", self._with_pool([]), follows=self._started_id)
            self._started_id = None

    async def submitted(self, job: Job) -> None:
        """After the claim, once the run's job is built: what the run is and where it runs."""
        related: list[Resource] = []
        tags: set[str] = set(job.flow_run.tags)
        if job.deployment is not None:
            related.append(_related("deployment", job.deployment.id, job.deployment.name))
            tags.update(job.deployment.tags)
        try:
            flow = await self.read_flow(job.flow_run)  # cached: the job was built with it
            related.append(_related("flow", flow.id, flow.name))
            tags.update(flow.tags)
        except APIError:
            related.append(_related("flow", job.flow_run.flow_id, job.flow_name))
        related.append(_related("flow-run", job.flow_run.id, job.flow_run.name))
        related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                    for tag in sorted(tags)]
        related = self._with_pool(related)
        event_id = self._emit("prefect.worker.submitted-flow-run", related)
        self._submitted[job.flow_run.id] = (event_id, related)

    def executed(self, flow_run_id: uuid.UUID, infrastructure_pid: str | None,
                 status_code: int | None) -> None:
        """After the infrastructure exited; only for runs submitted by this process, as Prefect."""
        submitted = self._submitted.pop(flow_run_id, None)
        if submitted is None:
            return
        event_id, related = submitted
        related = [dict(r) for r in related]
        for resource in related:
            if resource["prefect.resource.role"] == "flow-run":
                resource["prefect.infrastructure.identifier"] = str(infrastructure_pid)
                resource["prefect.infrastructure.status-code"] = str(status_code)
        self._emit("prefect.worker.executed-flow-run", related, follows=event_id)

    def forget(self, flow_run_id: uuid.UUID) -> None:
        """The run ended without its infrastructure exiting (start failed, detached)."""
        self._submitted.pop(flow_run_id, None)

    def _with_pool(self, related: list[Resource]) -> list[Resource]:
        return related + ([dict(self.pool)] if self.pool else [])

    def _emit(self, name: str, related: list[Resource], follows: str | None = None) -> str:
        event_id = str(uuid.uuid4())
        self._buffer.append({
            "id": event_id, "occurred": utcnow().isoformat(), "event": name,
            "resource": dict(self.resource), "related": related, "payload": {},
            "follows": follows,
        })
        while len(self._buffer) > MAX_BUFFERED:
            self._buffer.popleft()
            self._drop(1, "the buffer is full while the API cannot take events")
        self._wake.set()
        return event_id

    def _drop(self, count: int, why: str) -> None:
        self.metrics.events_dropped.inc(count)
        if not self._said_dropping:
            self._said_dropping = True
            log.warning("events.dropping", reason=why, buffer=MAX_BUFFERED,
                        hint="counted in flowhand_events_dropped_total; said once")

    # -- sending ----------------------------------------------------------------------------

    async def send_batch(self) -> bool:
        """Send up to BATCH buffered events; False when the API could not take them."""
        batch = [self._buffer[i] for i in range(min(BATCH, len(self._buffer)))]
        if not batch:
            return True
        try:
            await self.client.request("POST", "/events", json=batch, retries=1)
        except (AuthError, APIStatusError) as exc:
            if isinstance(exc, AuthError) or exc.status_code >= 500:
                return self._failed(exc)
            # A refused batch (422) would be refused again: give it up rather than block.
            for _ in batch:
                self._buffer.popleft()
            self._drop(len(batch), f"the API refused them: {exc}")
            return True
        except APIError as exc:
            return self._failed(exc)
        for _ in batch:
            self._buffer.popleft()
        self.metrics.events_sent.inc(len(batch))
        if self._failing:
            self._failing = False
            log.info("events.delivering_again", queued=len(self._buffer))
        return True

    def _failed(self, exc: APIError) -> bool:
        if not self._failing:
            self._failing = True
            log.warning("events.delayed", error=str(exc), queued=len(self._buffer),
                        hint="kept and sent once the API answers")
        return False

    async def flush(self) -> None:
        while self._buffer:
            if not await self.send_batch():
                return

    async def run(self) -> None:
        """Send batches as events come, backing off while the API is down; a last flush (for
        the stopped event) when cancelled."""
        failures = 0
        try:
            while True:
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = anyio.Event()
                while self._buffer:
                    if await self.send_batch():
                        failures = 0
                        continue
                    failures += 1
                    await anyio.sleep(backoff_seconds(failures, self.interval, 60.0))
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.flush()
