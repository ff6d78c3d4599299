"""The watchdog: runs whose cancellation was asked for, and runs past their maximum run time.

Every `watch_interval_seconds`, two small queries over the pool, whatever the number of runs in
flight: the runs being cancelled (CANCELLING), and those cancelled lately (a forced cancel skips
CANCELLING). Each match in flight is stopped with the reason that decides how it is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from flowhand.worker.context import WorkerContext
from flowhand.worker.runs import MAX_POLL_LIMIT, Run, RunPhase, StopReason

#: How far back (before the previous check) a forced CANCELLED counts: covers clock skew
#: between the worker and the server.
CANCELLED_LOOKBACK = timedelta(minutes=5)


def _now() -> datetime:
    return datetime.now(UTC)


class Watchdog:
    def __init__(self, ctx: WorkerContext, stop_soon: Callable[[Run], None]) -> None:
        self.ctx = ctx
        self.stop_soon = stop_soon
        self._cancel_checked_at: datetime | None = None

    async def check_cancellations(self) -> None:
        """Stop runs whose cancellation was asked for: CANCELLING, or forced to CANCELLED."""
        if all(run.stop_reason is StopReason.CANCEL for run in self.ctx.runs.values()):
            return
        checked_at = _now()
        since = (self._cancel_checked_at or checked_at) - CANCELLED_LOOKBACK
        queries: list[dict[str, Any]] = [
            {"state": {"type": {"any_": ["CANCELLING"]}}},
            {"state": {"type": {"any_": ["CANCELLED"]}}, "end_time": {"after_": since.isoformat()}},
        ]
        for flow_runs_filter in queries:
            await self._stop_cancelled(flow_runs_filter)
        self._cancel_checked_at = checked_at

    async def _stop_cancelled(self, flow_runs_filter: dict[str, Any]) -> None:
        ctx = self.ctx
        offset = 0
        while True:
            found = await ctx.client.read_flow_runs({
                "flow_runs": flow_runs_filter,
                "work_pools": {"name": {"any_": [ctx.pool_name]}},
                "sort": "ID_DESC",
                "limit": MAX_POLL_LIMIT,
                "offset": offset,
            })
            for flow_run in found:
                run = ctx.runs.get(flow_run.id)
                if run is None or not run.request_stop(StopReason.CANCEL):
                    continue
                run.log.info("flow_run.cancel_requested", state=flow_run.state_type and
                             flow_run.state_type.value, started=run.handle is not None)
                if run.handle is not None:
                    self.stop_soon(run)
            if len(found) < MAX_POLL_LIMIT:
                return
            offset += MAX_POLL_LIMIT

    def check_run_times(self) -> None:
        now = time.monotonic()
        for run in self.ctx.runs.values():
            limit = run.max_run_seconds
            if (run.phase is not RunPhase.RUNNING or run.started_at is None or limit is None
                    or run.stop_reason is not None):
                continue
            if now - run.started_at > limit:
                run.request_stop(StopReason.TIMEOUT)
                run.log.warning("flow_run.timed_out", max_run_seconds=limit)
                self.stop_soon(run)
