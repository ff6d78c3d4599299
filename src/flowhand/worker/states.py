"""The one writer of run states, labels, infrastructure ids and run logs to the server.

Like the state proposer of Prefect's runner: every write about a run goes through here, with
the rules in one place. Writes that must land (a final state, a hand-back, a restored state)
are retried through API outages and shielded from cancellation, so a stopping worker still
finishes them; best-effort writes (labels, the pid) log a warning and go on.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.filters import TaskRunFilter
from flowhand.api.models import WORKER_LABEL, OrchestrationResult, StateType, WorkPool
from flowhand.api.pagination import PAGE_SIZE
from flowhand.clock import utcnow
from flowhand.errors import APIError, NotFound
from flowhand.runlogs import RunLogs
from flowhand.service_loop import Backoff, retry_until

T = TypeVar("T")

#: Pause cap while a write that must land cannot be delivered (API outage).
MAX_DELIVERY_BACKOFF_SECONDS = 30.0


class StateWriter:
    """Writes about runs, for one worker."""

    def __init__(self, client: PrefectClient, run_logs: RunLogs, worker_name: str,
                 pool_type: str) -> None:
        self.client = client
        self.run_logs = run_logs
        self.worker_name = worker_name
        self.pool_type = pool_type

    # -- writes that must land ----------------------------------------------------------------

    async def deliver(
        self, what: str, call: Callable[[], Awaitable[T]], log: FilteringBoundLogger
    ) -> T | None:
        """Run `call` until it succeeds, shielded; None when the run is gone."""

        def report(exc: Exception, delay: float, failures: int) -> None:
            log.warning("flow_run.report_delayed", during=what, error=str(exc),
                        retry_in_seconds=round(delay, 2))

        async def attempt() -> tuple[T | None]:
            try:
                return (await call(),)
            except NotFound:
                log.info("flow_run.deleted", during=what)
                return (None,)

        with anyio.CancelScope(shield=True):
            result = await retry_until(
                attempt, retry_on=(APIError,),
                backoff=Backoff(1.0, MAX_DELIVERY_BACKOFF_SECONDS), on_failure=report)
        return result[0] if result is not None else None

    async def set_state(
        self,
        flow_run_id: uuid.UUID,
        state_type: StateType,
        log: FilteringBoundLogger,
        *,
        name: str | None = None,
        message: str | None = None,
        force: bool = False,
        scheduled_time: datetime | None = None,
        transition_id: uuid.UUID | None = None,
    ) -> OrchestrationResult | None:
        """Propose a state until the server answers; None when the run was deleted."""
        return await self.deliver(
            (name or state_type.value).lower(),
            lambda: self.client.set_flow_run_state(
                flow_run_id, state_type, name=name, message=message, force=force,
                scheduled_time=scheduled_time, transition_id=transition_id),
            log)

    async def hand_back(
        self, flow_run_id: uuid.UUID, message: str, log: FilteringBoundLogger
    ) -> OrchestrationResult | None:
        """AwaitingRetry, due now: any worker of the pool may take the run."""
        return await self.set_state(flow_run_id, StateType.SCHEDULED, log, name="AwaitingRetry",
                                    message=message, scheduled_time=utcnow(), force=True)

    async def add_labels(
        self, flow_run_id: uuid.UUID, labels: dict[str, str], log: FilteringBoundLogger
    ) -> None:
        await self.deliver("label", lambda: self.client.update_flow_run_labels(
            flow_run_id, labels), log)

    # -- single proposals: their answers and errors are the caller's -------------------------

    async def propose_pending(
        self, flow_run_id: uuid.UUID, transition_id: uuid.UUID
    ) -> OrchestrationResult:
        """Propose PENDING once (the client retries transport errors with the same id)."""
        return await self.client.set_flow_run_state(
            flow_run_id, StateType.PENDING, transition_id=transition_id)

    async def propose_hand_back(
        self, flow_run_id: uuid.UUID, message: str, transition_id: uuid.UUID
    ) -> OrchestrationResult:
        """Propose AwaitingRetry (due now) without force: the server's duplicate-transition
        rule refuses a second proposal with the same transition id."""
        return await self.client.set_flow_run_state(
            flow_run_id, StateType.SCHEDULED, name="AwaitingRetry", message=message,
            scheduled_time=utcnow(), transition_id=transition_id)

    # -- best-effort writes -----------------------------------------------------------------

    async def label_claimed(
        self, flow_run_id: uuid.UUID, pool: WorkPool, log: FilteringBoundLogger
    ) -> None:
        """Mark the run as ours on the server, so a restarted worker finds it by name."""
        labels = {
            WORKER_LABEL: self.worker_name,
            "prefect.worker.type": self.pool_type,
            "prefect.work-pool.name": pool.name,
            "prefect.work-pool.id": str(pool.id),
        }
        try:
            await self.client.update_flow_run_labels(flow_run_id, labels)
        except APIError as exc:
            log.warning("flow_run.labels_failed", error=str(exc))

    async def record_pid(
        self, flow_run_id: uuid.UUID, infrastructure_pid: str, log: FilteringBoundLogger
    ) -> None:
        try:
            await self.client.set_infrastructure_pid(flow_run_id, infrastructure_pid)
        except APIError as exc:
            log.warning("flow_run.pid_not_recorded", infrastructure_pid=infrastructure_pid,
                        error=str(exc))

    async def close_task_runs(
        self,
        flow_run_id: uuid.UUID,
        state_type: StateType,
        message: str,
        log: FilteringBoundLogger,
    ) -> None:
        """Set the run's task runs still PENDING or RUNNING to `state_type`."""
        body = TaskRunFilter(flow_run_ids=[flow_run_id],
                             states=[StateType.PENDING, StateType.RUNNING], limit=PAGE_SIZE).body()
        closed = 0
        # Each pass closes what the first page shows, so the first page is always the next
        # batch (offset paging would skip runs that left the filter); bounded.
        for _ in range(100):
            try:
                task_runs = await self.client.read_task_runs(body)
            except APIError as exc:
                log.warning("flow_run.task_runs_not_closed", error=str(exc))
                return
            if not task_runs:
                break
            for task_run in task_runs:
                try:
                    await self.client.set_task_run_state(task_run.id, state_type, message,
                                                         force=True)
                    closed += 1
                except APIError as exc:
                    log.warning("flow_run.task_runs_not_closed", error=str(exc))
                    return
        if closed:
            log.info("flow_run.task_runs_closed", count=closed, state=state_type.value)

    def post_log(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        """Queue a line for the run's logs in the Prefect UI (sent in batches)."""
        self.run_logs.add(flow_run_id, level, message)

    def post_output(self, flow_run_id: uuid.UUID, line: str) -> None:
        self.run_logs.add_output(flow_run_id, line)
