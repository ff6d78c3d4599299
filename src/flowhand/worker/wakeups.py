"""When the poller asks for runs next: at once when the server says a run of the pool became
due, just in time for the next run known to fall due later, and otherwise after a slow
safety-net interval.

The server's event stream (`flowhand.api.event_stream`) says when a run of the pool enters
SCHEDULED; that wakes the poller, debounced (one poll per `MIN_POLL_GAP` at most, however many
events arrive, and one more for those that arrive during a poll). An event does not say when
the run is due, so when the poll after it did not return the run (it is due later than
`prefetch_seconds` ahead), one look-ahead query reads the pool's next due run, and the poller
wakes `prefetch_seconds` before that run's time: the claim lands ahead and the run starts on
time (`RunSupervisor` waits for it), with no poll in between. CANCELLING and CANCELLED go to
the callbacks given to `on_cancel` (the watchdog's) as they happen.

While the stream is open, the periodic poll and the watchdog's cancellation query run every
`[event_stream] poll_interval_seconds` (30 s; Prefect's worker polls every 10 s) as a safety
net; the poll at most every 10 s while runs are in flight. A lost stream is one warning
line: the worker goes back to polling every
`poll_interval_seconds` (2 s) and reopens the stream with backoff.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.event_stream import EventStream, RunEvent, StreamLost
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import StateType, WorkPool
from flowhand.clock import utcnow
from flowhand.config import Config
from flowhand.errors import APIError
from flowhand.metrics import Metrics
from flowhand.service_loop import Backoff, sleep_unless
from flowhand.worker.runs import RunTable, pool_of

#: The least time between two polls the stream asks for: a burst of events is a few polls.
MIN_POLL_GAP = 0.5
#: Most of a random pause before a woken poll: the workers of a fleet, woken by one event,
#: do not all poll (and claim the same runs) at the same instant.
WAKE_JITTER = 0.2
#: A wake-up for a known due run lands this far inside the prefetch window.
WAKE_MARGIN = 0.25
#: The safety net while runs are in flight (Prefect's poll interval): a busy pool does not
#: depend on every event arriving (the server drops events for a subscriber that lags).
BUSY_SAFETY_NET = 10.0
#: Events replayed on (re)connecting: from this long before the last one seen (or the start),
#: which also covers a worker clock somewhat ahead of the server's.
REPLAY = timedelta(seconds=60)


class Wakeups:
    """The event stream's side of the poller's schedule (its `wait`) and of cancellations."""

    def __init__(self, *, config: Config, client: PrefectClient, runs: RunTable,
                 metrics: Metrics, log: FilteringBoundLogger, stop: anyio.Event,
                 pool: Callable[[], WorkPool]) -> None:
        self.config = config
        self.client = client
        self.runs = runs
        self.metrics = metrics
        self.log = log
        #: Set when the worker stops claiming runs.
        self.stop = stop
        #: The pool, once read (the stream is opened after that).
        self.pool = pool
        #: Told of each run whose cancellation the stream reports (the watchdog's).
        self._cancel_listeners: list[Callable[[uuid.UUID, StateType], None]] = []
        #: Poll and cancellation query interval while the stream is open.
        self.safety_net_seconds = max(config.poll_interval_seconds,
                                      config.event_stream.poll_interval_seconds)
        #: Whether the stream is open.
        self.healthy = False
        self._wake = anyio.Event()
        self._last_poll = -math.inf
        #: Runs that entered SCHEDULED since the last poll that saw them.
        self._unseen: set[uuid.UUID] = set()
        self._look_ahead = False
        #: Monotonic time to wake for the next run known to fall due.
        self._next_due: float | None = None
        self._last_event: datetime | None = None
        self._backoff = Backoff(1.0, 60.0)

    # -- the stream ------------------------------------------------------------------------

    def on_cancel(self, callback: Callable[[uuid.UUID, StateType], None]) -> None:
        """Call `callback(flow_run_id, state_type)` for each cancellation the stream reports."""
        self._cancel_listeners.append(callback)

    async def run(self) -> None:
        """Keep the stream open until the worker stops."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_open)
            await self.stop.wait()
            self._wake.set()
            tg.cancel_scope.cancel()

    async def _keep_open(self) -> None:
        api = self.config.api
        secret = api.key or api.auth_string
        stream = EventStream(self.client.transport, self.pool().id,
                             secret.get_secret_value() if secret else None)
        while True:
            since = (self._last_event or utcnow()) - REPLAY
            try:
                await stream.listen(since, self._opened, self._event)
            except StreamLost as exc:
                self._lost(str(exc))
            await anyio.sleep(self._backoff.failed())

    def _opened(self) -> None:
        failures = self._backoff.succeeded()
        self.healthy = True
        self.metrics.event_stream_open.set(1)
        self.log.info("event_stream.open", after_failures=failures,
                          safety_net_poll_seconds=self.safety_net_seconds)
        # What happened while it was closed: a poll now, and the next due run.
        self._look_ahead = True
        self.poke()

    def _lost(self, reason: str) -> None:
        if self.healthy:
            self.log.warning("event_stream.lost", reason=reason,
                                 poll_interval_seconds=self.config.poll_interval_seconds,
                                 hint="polling at the fast interval until it is back")
        elif self._backoff.failures == 0:
            self.log.warning("event_stream.unavailable", reason=reason,
                                 poll_interval_seconds=self.config.poll_interval_seconds,
                                 hint="polling at the fast interval; retrying with backoff")
        else:
            self.log.debug("event_stream.retry_failed", reason=reason,
                               failures=self._backoff.failures)
        self.healthy = False
        self.metrics.event_stream_open.set(0)
        self._next_due = None
        self.poke()  # the poller re-plans with the fast interval

    def _event(self, event: RunEvent) -> None:
        if self._last_event is None or event.occurred > self._last_event:
            self._last_event = event.occurred
        queues = self.config.work_queues
        if queues and event.queue is not None and event.queue not in queues:
            return
        if event.state_type is StateType.SCHEDULED:
            self._unseen.add(event.flow_run_id)
            self.poke()
        else:
            for listener in self._cancel_listeners:
                listener(event.flow_run_id, event.state_type)

    # -- the poller's schedule -------------------------------------------------------------

    def poke(self) -> None:
        """Poll as soon as the debounce allows."""
        self._wake.set()

    def polled(self, found: Iterable[uuid.UUID], full: bool) -> None:
        """After each poll: the runs it returned; `full` when it may have left some out."""
        self._last_poll = time.monotonic()
        self._unseen.difference_update(found)
        if full:
            self.poke()

    async def wait(self, interval: float) -> bool:
        """Until the next poll (service_loop's `wait` after a good poll, `interval` the fast
        one); True when the worker stops."""
        stop = self.stop
        if not self._wake.is_set() and (self._unseen or self._look_ahead):
            await self._find_next_due(interval)
        with anyio.move_on_after(self._timeout(interval)):
            await self._wake.wait()
        if self._next_due is not None and time.monotonic() >= self._next_due:
            self._next_due = None
            self._look_ahead = True
        gap = max(self._last_poll + MIN_POLL_GAP - time.monotonic(),
                  random.uniform(0.0, WAKE_JITTER) if self._wake.is_set() else 0.0)
        stopped = await sleep_unless(stop, gap) if gap > 0 else stop.is_set()
        self._wake = anyio.Event()
        return stopped

    def _timeout(self, interval: float) -> float:
        """The fast interval without the stream or without free slots (polls are then free);
        the safety net otherwise (at most 10 s while runs are in flight); sooner when a known
        run falls due."""
        slow = self.healthy and self.runs.free_slots() > 0
        timeout = interval
        if slow:
            busy = len(self.runs) > 0
            timeout = min(self.safety_net_seconds, max(BUSY_SAFETY_NET, interval)) if busy \
                else self.safety_net_seconds
        if self._next_due is not None:
            timeout = min(timeout, self._next_due - time.monotonic())
        return max(0.0, timeout)

    async def _find_next_due(self, interval: float) -> None:
        """Read when the pool's next run beyond the prefetch window falls due (one query)."""
        self._unseen.clear()
        self._look_ahead = False
        if not self.healthy:
            return  # fast polls see every run prefetch_seconds ahead
        prefetch = self.config.prefetch_seconds
        now = utcnow()
        body = FlowRunFilter(
            states=[StateType.SCHEDULED], next_scheduled_after=now + timedelta(seconds=prefetch),
            pool=pool_of(self.config), queues=self.config.work_queues or None,
            sort="NEXT_SCHEDULED_START_TIME_ASC", limit=1).body()
        try:
            found = await self.client.read_flow_runs(body)
        except APIError as exc:
            self.log.debug("event_stream.look_ahead_failed", error=str(exc))
            self._next_due = time.monotonic() + interval
            self._look_ahead = True
            return
        due = found[0].next_scheduled_start_time if found else None
        if due is None:
            self._next_due = None
            return
        seconds = (due - now).total_seconds() - prefetch + WAKE_MARGIN
        self._next_due = time.monotonic() + max(0.0, seconds)
        self.log.debug("event_stream.next_due", flow_run_id=str(found[0].id),
                      wake_in_seconds=round(seconds, 3))
