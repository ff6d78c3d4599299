"""Polling: ask the pool for due runs (as many as there are free slots) and hand them on.

The window is `prefetch_seconds` ahead of now and, with `max_late_seconds`, that far behind;
runs left out because they are too late are counted on the heartbeat, so none is missed
quietly.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import StateType
from flowhand.clock import utcnow
from flowhand.errors import (
    APIError,
    APIResponseError,
    APIUnreachable,
    AuthError,
    BackendUnavailable,
    FlowhandError,
    NotFound,
)
from flowhand.service_loop import Backoff, service_loop
from flowhand.worker.context import WorkerContext
from flowhand.worker.runs import MAX_POLL_LIMIT, Run
from flowhand.worker.wakeups import Wakeups

#: Cap on the pause between failed polls.
MAX_POLL_BACKOFF_SECONDS = 60.0


class Poller:
    def __init__(self, ctx: WorkerContext, handle_run: Callable[[Run], Awaitable[None]],
                 wakeups: Wakeups | None = None) -> None:
        self.ctx = ctx
        self.handle_run = handle_run
        #: With the event stream: when to poll next (else every `poll_interval_seconds`).
        self.wakeups = wakeups

    async def run(self) -> None:
        """Poll every `poll_interval_seconds` until the worker stops; back off on failures."""
        ctx = self.ctx
        interval = ctx.config.poll_interval_seconds

        async def step() -> None:
            await self.poll_once()
            ctx.health.unhealthy_reason = None

        def failed(exc: Exception, delay: float, failures: int) -> None:
            assert isinstance(exc, FlowhandError)
            ctx.metrics.api_error(error_kind(exc))
            ctx.health.unhealthy_reason = self.describe_error(exc)
            level = "error" if isinstance(exc, AuthError | NotFound) else "warning"
            getattr(ctx.log, level)(
                "poll.failed", error=ctx.health.unhealthy_reason, failures=failures,
                retry_in_seconds=round(delay, 2))

        await service_loop(
            step, interval=interval, retry_on=(APIError, BackendUnavailable),
            backoff=Backoff(interval, MAX_POLL_BACKOFF_SECONDS), on_failure=failed,
            on_recovery=lambda n: ctx.log.info("poll.recovered", after_failures=n),
            stop=ctx.stop, wait=self.wakeups.wait if self.wakeups is not None else None)

    async def poll_once(self) -> int:
        """Ask for due runs (at most the free slots) and start handling each; return how many."""
        ctx = self.ctx
        free = ctx.runs.free_slots()
        if free <= 0:
            ctx.log.debug("poll.skipped", reason="no free slots", in_flight=len(ctx.runs))
            return 0
        if not ctx.space.room_to_claim():
            ctx.log.debug("poll.skipped", reason=ctx.space.reason)
            return 0
        await ctx.backend.check()
        now = utcnow()
        late = ctx.config.max_late_seconds
        started = time.monotonic()
        limit = min(free, MAX_POLL_LIMIT)
        responses = await ctx.client.get_scheduled_flow_runs(
            ctx.pool_name,
            work_queue_names=ctx.config.work_queues,
            scheduled_before=now + timedelta(seconds=ctx.config.prefetch_seconds),
            scheduled_after=now - timedelta(seconds=late) if late is not None else None,
            limit=limit,
        )
        if self.wakeups is not None:
            self.wakeups.polled((r.flow_run.id for r in responses), full=len(responses) >= limit)
        polled_at = ctx.health.polled()
        ctx.metrics.poll_duration.observe(polled_at - started)
        ctx.metrics.last_poll.set_to_current_time()
        submitted = 0
        for response in responses:
            flow_run = response.flow_run
            if flow_run.id in ctx.runs:
                continue
            if ctx.runs.free_slots() <= 0 or ctx.stop.is_set():
                break
            ctx.runs.spawn(self.handle_run, ctx.runs.track(flow_run))
            submitted += 1
        ctx.log.debug("poll.done", found=len(responses), submitted=submitted,
                      duration_seconds=round(time.monotonic() - started, 4))
        return submitted

    async def report_too_late(self) -> None:
        """Say how many runs `max_late_seconds` keeps us from taking, so none is missed quietly."""
        ctx = self.ctx
        if ctx.config.max_late_seconds is None:
            return
        cutoff = utcnow() - timedelta(seconds=ctx.config.max_late_seconds)
        body = FlowRunFilter(states=[StateType.SCHEDULED], next_scheduled_before=cutoff,
                             pool=ctx.pool_name, queues=ctx.config.work_queues or None).body()
        try:
            count = await ctx.client.count_flow_runs(body)
        except APIError as exc:
            ctx.log.debug("poll.late_count_failed", error=str(exc))
            return
        if count:
            ctx.log.warning("poll.too_late_skipped", count=count,
                            max_late_seconds=ctx.config.max_late_seconds,
                            hint="these runs are left alone; raise max_late_seconds to run them")

    def describe_error(self, exc: FlowhandError) -> str:
        ctx = self.ctx
        if isinstance(exc, AuthError):
            return (f"the API refused our credentials ({exc.status_code}): check "
                    "PREFECT_API_KEY or PREFECT_API_AUTH_STRING")
        if isinstance(exc, NotFound):
            return (f"work pool {ctx.pool_name!r} or one of its queues "
                    f"{ctx.config.work_queues or ''} no longer exists ({exc.detail})")
        return str(exc)


def error_kind(exc: FlowhandError) -> str:
    """The `kind` label of the API error metric."""
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, APIUnreachable):
        return "transport"
    if isinstance(exc, APIResponseError):
        return "response"
    if isinstance(exc, BackendUnavailable):
        return "backend"
    return "status"
