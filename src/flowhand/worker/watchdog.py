"""The watchdog: runs whose cancellation was asked for, and runs past their maximum run time.

Every `watch_interval_seconds`, two small queries over the pool, whatever the number of runs in
flight: the runs being cancelled (CANCELLING), and those cancelled lately (a forced cancel skips
CANCELLING). Each match in flight is stopped with the reason that decides how it is reported.
While the event stream is open it reports cancellations as they happen (`cancel_requested`),
and the queries are a safety net run every `[event_stream] poll_interval_seconds`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import FlowRun, StateType
from flowhand.api.pagination import paginate
from flowhand.backends.base import StopIntent
from flowhand.clock import utcnow
from flowhand.worker.runs import Run, RunPhase, RunTable
from flowhand.worker.wakeups import Wakeups

#: How far back (before the previous check) a forced CANCELLED counts: covers clock skew
#: between the worker and the server.
CANCELLED_LOOKBACK = timedelta(minutes=5)


class Watchdog:
    def __init__(self, client: PrefectClient, pool_name: str, runs: RunTable,
                 stop_soon: Callable[[Run], None], stream: Wakeups | None = None) -> None:
        self.client = client
        self.pool_name = pool_name
        self.runs = runs
        self.stop_soon = stop_soon
        self.stream = stream
        self._cancel_checked_at: datetime | None = None
        self._queried_at: float | None = None

    async def check_cancellations(self) -> None:
        """Stop runs whose cancellation was asked for: CANCELLING, or forced to CANCELLED."""
        if all(run.stop_intent is StopIntent.CANCEL for run in self.runs.values()):
            return
        stream = self.stream
        if (stream is not None and stream.healthy and self._queried_at is not None
                and time.monotonic() - self._queried_at < stream.safety_net_seconds):
            return
        self._queried_at = time.monotonic()
        checked_at = utcnow()
        since = (self._cancel_checked_at or checked_at) - CANCELLED_LOOKBACK
        queries = [
            FlowRunFilter(states=[StateType.CANCELLING], pool=self.pool_name, sort="ID_DESC"),
            FlowRunFilter(states=[StateType.CANCELLED], ended_after=since,
                          pool=self.pool_name, sort="ID_DESC"),
        ]
        for query in queries:
            async for found in paginate(self.client.read_flow_runs, query.body()):
                self._stop_cancelled(found)
        self._cancel_checked_at = checked_at

    def _stop_cancelled(self, found: list[FlowRun]) -> None:
        for flow_run in found:
            self.cancel_requested(flow_run.id, flow_run.state_type)

    def cancel_requested(self, flow_run_id: uuid.UUID, state: StateType | None) -> None:
        """Stop a run in flight whose cancellation was asked for (found by the queries, or
        reported by the event stream)."""
        run = self.runs.get(flow_run_id)
        if run is None or not run.request_stop(StopIntent.CANCEL):
            return
        run.log.info("flow_run.cancel_requested", state=state and state.value,
                     started=run.handle is not None)
        if run.handle is not None:
            self.stop_soon(run)

    def check_run_times(self) -> None:
        now = time.monotonic()
        for run in self.runs.values():
            limit = run.max_run_seconds
            if (run.phase is not RunPhase.RUNNING or run.started_at is None or limit is None
                    or run.stop_intent is not None):
                continue
            if now - run.started_at > limit:
                # Relinquished: the engine exits without a state, flowhand reports it CRASHED.
                run.request_stop(StopIntent.RELINQUISH)
                run.enter(run.phase, "timed_out", max_run_seconds=limit)
                self.stop_soon(run)
