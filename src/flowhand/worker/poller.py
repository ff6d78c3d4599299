"""Polling: ask the pool for due runs (as many as there are free slots) and hand them on.

The window is `prefetch_seconds` ahead of now and, with `max_late_seconds`, that far behind;
runs left out because they are too late are counted on the heartbeat, so none is missed
quietly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import StateType
from flowhand.backends.base import Backend
from flowhand.clock import utcnow
from flowhand.config import Config
from flowhand.errors import (
    APIError,
    APIResponseError,
    APIUnreachable,
    AuthError,
    BackendUnavailable,
    FlowhandError,
    NotFound,
)
from flowhand.metrics import Metrics
from flowhand.service_loop import Backoff, service_loop, sleep_unless
from flowhand.worker.health import Health
from flowhand.worker.runs import MAX_POLL_LIMIT, Run, RunTable, pool_of
from flowhand.worker.space import SpaceGuard
from flowhand.worker.wakeups import Wakeups

#: Cap on the pause between failed polls.
MAX_POLL_BACKOFF_SECONDS = 60.0
#: Polls `--run-once` tries before it gives up (pauses as the service loop's, ~15 s in all).
RUN_ONCE_POLL_ATTEMPTS = 5


class Poller:
    def __init__(self, *, config: Config, client: PrefectClient, backend: Backend,
                 runs: RunTable, health: Health, space: SpaceGuard, metrics: Metrics,
                 log: FilteringBoundLogger, stop: anyio.Event,
                 handle_run: Callable[[Run], Awaitable[None]],
                 wakeups: Wakeups | None = None) -> None:
        self.config = config
        self.pool_name = pool_of(config)
        self.client = client
        self.backend = backend
        self.runs = runs
        self.health = health
        #: Whether state_dir has room for another claim.
        self.space = space
        self.metrics = metrics
        self.log = log
        #: Set when the worker stops claiming runs.
        self.stop = stop
        self.handle_run = handle_run
        #: With the event stream: when to poll next (else every `poll_interval_seconds`).
        self.wakeups = wakeups

    async def run(self) -> None:
        """Poll every `poll_interval_seconds` until the worker stops; back off on failures."""
        interval = self.config.poll_interval_seconds

        async def step() -> None:
            await self.poll_once()
            self.health.unhealthy_reason = None

        def failed(exc: Exception, delay: float, failures: int) -> None:
            assert isinstance(exc, FlowhandError)
            self.metrics.api_error(error_kind(exc))
            self.health.unhealthy_reason = self.describe_error(exc)
            level = "error" if isinstance(exc, AuthError | NotFound) else "warning"
            getattr(self.log, level)(
                "poll.failed", error=self.health.unhealthy_reason, failures=failures,
                retry_in_seconds=round(delay, 2))

        await service_loop(
            step, interval=interval, retry_on=(APIError, BackendUnavailable),
            backoff=Backoff(interval, MAX_POLL_BACKOFF_SECONDS), on_failure=failed,
            on_recovery=lambda n: self.log.info("poll.recovered", after_failures=n),
            stop=self.stop, wait=self.wakeups.wait if self.wakeups is not None else None)

    async def poll_once_retrying(self, attempts: int = RUN_ONCE_POLL_ATTEMPTS) -> int:
        """`--run-once`'s poll: a failing poll is tried again with the service loop's pauses
        (a busy server's 503s must not leave a waiting run unclaimed); the last failure is
        raised."""
        backoff = Backoff(self.config.poll_interval_seconds, MAX_POLL_BACKOFF_SECONDS)
        while True:
            try:
                return await self.poll_once()
            except (APIError, BackendUnavailable) as exc:
                if backoff.failures + 1 >= attempts or self.stop.is_set():
                    raise
                delay = backoff.failed()
                self.metrics.api_error(error_kind(exc))
                self.log.warning("poll.failed", error=self.describe_error(exc),
                                 failures=backoff.failures, retry_in_seconds=round(delay, 2))
                if await sleep_unless(self.stop, delay):
                    return 0

    async def poll_once(self) -> int:
        """Ask for due runs (at most the free slots) and start handling each; return how many."""
        free = self.runs.free_slots()
        if free <= 0:
            self.log.debug("poll.skipped", reason="no free slots", in_flight=len(self.runs))
            return 0
        if not self.space.room_to_claim():
            self.log.debug("poll.skipped", reason=self.space.reason)
            return 0
        await self.backend.check()
        now = utcnow()
        late = self.config.max_late_seconds
        started = time.monotonic()
        limit = min(free, MAX_POLL_LIMIT)
        responses = await self.client.get_scheduled_flow_runs(
            self.pool_name,
            work_queue_names=self.config.work_queues,
            scheduled_before=now + timedelta(seconds=self.config.prefetch_seconds),
            scheduled_after=now - timedelta(seconds=late) if late is not None else None,
            limit=limit,
        )
        if self.wakeups is not None:
            self.wakeups.polled((r.flow_run.id for r in responses), full=len(responses) >= limit)
            # Workers woken by one event poll together: each takes the batch in its own order,
            # so a fleet splits it instead of all racing for the same run first.
            random.shuffle(responses)
        polled_at = self.health.polled()
        self.metrics.poll_duration.observe(polled_at - started)
        self.metrics.last_poll.set_to_current_time()
        submitted = 0
        for response in responses:
            flow_run = response.flow_run
            if flow_run.id in self.runs:
                continue
            if self.runs.free_slots() <= 0 or self.stop.is_set():
                break
            self.runs.spawn(self.handle_run, self.runs.track(flow_run))
            submitted += 1
        self.log.debug("poll.done", found=len(responses), submitted=submitted,
                       duration_seconds=round(time.monotonic() - started, 4))
        return submitted

    async def report_too_late(self) -> None:
        """Say how many runs `max_late_seconds` keeps us from taking, so none is missed quietly."""
        if self.config.max_late_seconds is None:
            return
        cutoff = utcnow() - timedelta(seconds=self.config.max_late_seconds)
        body = FlowRunFilter(states=[StateType.SCHEDULED], next_scheduled_before=cutoff,
                             pool=self.pool_name, queues=self.config.work_queues or None).body()
        try:
            count = await self.client.count_flow_runs(body)
        except APIError as exc:
            self.log.debug("poll.late_count_failed", error=str(exc))
            return
        if count:
            self.log.warning("poll.too_late_skipped", count=count,
                             max_late_seconds=self.config.max_late_seconds,
                             hint="these runs are left alone; raise max_late_seconds to run them")

    def describe_error(self, exc: FlowhandError) -> str:
        if isinstance(exc, AuthError):
            return (f"the API refused a request ({exc}): check PREFECT_API_KEY or "
                    "PREFECT_API_AUTH_STRING")
        if isinstance(exc, NotFound):
            return (f"work pool {self.pool_name!r} or one of its queues "
                    f"{self.config.work_queues or ''} no longer exists ({exc.detail})")
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
