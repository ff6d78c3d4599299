"""The exit watcher: one task following the daemon's event stream for all containers.

Exits are not waited for with `POST /containers/{id}/wait` (a connection held per run for its
whole life): one task follows the daemon's event stream for `die`/`oom` events of
Prefect-labelled containers and wakes the waiting task, which then reads the exit code with
`inspect` when the event alone does not tell enough.

The Backend interface gives the backend no task group of its own, so the watcher's task belongs
to the event loop: started with the connection, cancelled and awaited by `aclose()`. It also
holds the connection pool: when it ends, the pool is closed, so an event loop that ends without
`aclose()` (which cancels every task) leaves no socket behind.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.client import Engine
from flowhand.backends.docker.errors import explain
from flowhand.backends.docker.spec import FLOW_RUN_LABEL
from flowhand.backends.docker.streams import ContainerEvent, EngineError, container_event

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

#: On (re)subscribing, ask the daemon to replay this much history: dockerd flushes the response
#: headers before it registers the listener, and a container may die in between.
EVENT_REPLAY_SECONDS = 5
#: How many recent die/oom events are remembered for containers nobody waits on yet (a container
#: that exits, and with auto_remove vanishes, before `wait()` registers).
SEEN_EVENTS_KEPT = 4096
#: The events followed: deaths and OOM kills of containers that carry a flow run's label.
EVENT_FILTERS: dict[str, str | list[str]] = {
    "type": "container", "event": ["die", "oom"], "label": [FLOW_RUN_LABEL],
}


def next_delay(delay: float, lived: float | None) -> float:
    """Seconds before subscribing again, after a stream that lived `lived` seconds (None: the
    subscription itself failed). A stream that lived a while was healthy: at once. One that
    keeps failing or dying young (a proxy cutting it, a daemon restarting) backs off."""
    if lived is not None and lived > 30:
        return 0.0
    return min(max(0.5, delay * 2), 30.0)


@dataclass
class Seen:
    """What the events said about one container."""

    died: bool = False
    exit_code: int | None = None
    oom: bool = False


class Waiter:
    """One task's interest in one container; woken on its events and on resubscription."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        self.changed = anyio.Event()

    def arm(self) -> None:
        # A fresh event *before* inspecting, so an event that lands during the inspect is kept.
        self.changed = anyio.Event()


class ExitWatcher:
    """One task following the daemon's event stream, waking the tasks waiting on containers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._waiters: dict[str, set[Waiter]] = {}
        self.seen: OrderedDict[str, Seen] = OrderedDict()
        #: The event stream is up: every `die` from now on reaches `seen`.
        self.subscribed = False
        self._task = asyncio.get_running_loop().create_task(
            self._follow(), name="flowhand-docker-events")

    def register(self, container_id: str) -> Waiter:
        waiter = Waiter(container_id)
        self._waiters.setdefault(container_id, set()).add(waiter)
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        waiters = self._waiters.get(waiter.container_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.container_id]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.wait({self._task})

    async def _follow(self) -> None:
        try:
            await self._subscribe_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self._engine.aclose()

    async def _subscribe_forever(self) -> None:
        since = int(time.time()) - EVENT_REPLAY_SECONDS
        delay = 0.0
        while True:
            subscribed_at: float | None = None
            try:
                async with self._engine.events(since=since, filters=EVENT_FILTERS) as events:
                    self._on_subscribed()
                    subscribed_at = time.monotonic()
                    async for raw in events:
                        event = container_event(raw)
                        if event is not None:
                            since = max(since, (event.time or since) - 1)
                            self._on_event(event)
                error = "the daemon closed the event stream"
            except EngineError as exc:  # unreachable, refused, or the stream broke: again later
                error = explain(exc)
            except Exception as exc:  # noqa: BLE001 - this task must outlive any surprise
                log.exception("docker.events_failed")
                error = f"{type(exc).__name__}: {exc}"
            lived = None if subscribed_at is None else time.monotonic() - subscribed_at
            delay = next_delay(delay, lived)
            self._on_lost(error, delay)
            await anyio.sleep(delay)
            if lived is not None:
                # Everyone re-inspects after resubscribing; the replay only recovers `oom` flags
                # and exit codes of auto-removed containers, so a bounded window is enough.
                since = max(since, int(time.time()) - 60)

    def _on_subscribed(self) -> None:
        self.subscribed = True
        log.debug("docker.events_subscribed", watching=len(self._waiters))
        # Anything may have happened while we were not subscribed: everyone looks again.
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.changed.set()

    def _on_lost(self, error: str, retry_in: float) -> None:
        self.subscribed = False
        log.warning("docker.events_lost", error=error, retry_in_seconds=retry_in,
                    watching=len(self._waiters))

    def _on_event(self, event: ContainerEvent) -> None:
        seen = self.seen.pop(event.container_id, None) or Seen()
        self.seen[event.container_id] = seen
        while len(self.seen) > SEEN_EVENTS_KEPT:
            self.seen.popitem(last=False)
        if event.action == "oom":
            seen.oom = True
        else:
            seen.died = True
            seen.exit_code = event.exit_code
        for waiter in self._waiters.get(event.container_id, ()):
            waiter.changed.set()
