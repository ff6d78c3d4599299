"""The exit watcher: one thread following the daemon's event stream for all containers.

Exits are not waited for with `container.wait()` (a thread per run for its whole life): a single
thread follows the daemon's event stream for `die`/`oom` events of Prefect-labelled containers
and wakes the waiting task, which then reads the exit code with `inspect` when the event alone
does not tell enough.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.errors import DOCKER_ERRORS, explain
from flowhand.backends.docker.spec import FLOW_RUN_LABEL
from flowhand.errors import BackendUnavailable

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

#: On (re)subscribing, ask the daemon to replay this much history: dockerd flushes the response
#: headers before it registers the listener, and a container may die in between.
EVENT_REPLAY_SECONDS = 5
#: How many recent die/oom events are remembered for containers nobody waits on yet (a container
#: that exits, and with auto_remove vanishes, before `wait()` registers).
SEEN_EVENTS_KEPT = 4096
#: What subscribing raises when the daemon does not answer (the probe, or the request itself).
_SUBSCRIBE_ERRORS: tuple[type[Exception], ...] = (BackendUnavailable, *DOCKER_ERRORS)


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
    """One thread following the daemon's event stream, handing events to the event loop."""

    def __init__(
        self, api: Any, token: anyio.lowlevel.EventLoopToken, probe: Callable[[], None]
    ) -> None:
        self._api = api
        self._token = token
        self._probe = probe
        self._waiters: dict[str, set[Waiter]] = {}
        self.seen: OrderedDict[str, Seen] = OrderedDict()
        #: The event stream is up: every `die` from now on reaches `seen`.
        self.subscribed = False
        self._closing = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(
            target=self._follow, name="flowhand-docker-events", daemon=True
        )
        self._thread.start()

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

    def close(self) -> None:
        self._closing.set()
        stream = self._stream
        if stream is not None:
            # Shuts the socket down, which ends the thread's blocking read.
            stream.close()

    # The methods below run in the watcher thread, except the `_on_*` callbacks, which it
    # schedules on the event loop so that waiters and `seen` are only touched there.

    def _post(self, func: Callable[..., None], *args: Any) -> bool:
        try:
            anyio.from_thread.run_sync(func, *args, token=self._token)
        except RuntimeError:  # the event loop is gone: nobody is left to tell
            return False
        return True

    def _follow(self) -> None:
        since = int(time.time()) - EVENT_REPLAY_SECONDS
        delay = 0.0
        while not self._closing.is_set():
            try:
                self._probe()
                stream = self._api.events(
                    since=since,
                    filters={"type": "container", "event": ["die", "oom"],
                             "label": [FLOW_RUN_LABEL]},
                    decode=True,
                )
            except _SUBSCRIBE_ERRORS as exc:  # try again later
                delay = min(max(0.5, delay * 2), 30.0)
                self._post(self._on_lost, explain(exc), delay)
                self._closing.wait(delay)
                continue
            self._stream = stream
            if self._closing.is_set():
                stream.close()
                return
            if not self._post(self._on_subscribed):
                stream.close()
                return
            subscribed_at = time.monotonic()
            error = "the daemon closed the event stream"
            try:
                for event in stream:
                    since = max(since, int(event.get("time", since)) - 1)
                    if not self._post(self._on_event, event):
                        return
            except Exception as exc:  # noqa: BLE001 - the connection broke; resubscribe
                # Broad on purpose: `close()` from the event loop's side ends the blocking read
                # with whatever the socket layer raises (OSError, ValueError on a closed file,
                # a JSON error on a cut line), and this thread must outlive all of them.
                error = explain(exc)
            finally:
                stream.close()
            if self._closing.is_set():
                return
            # A stream that lived a while was healthy: reconnect at once. One that keeps dying
            # young (a proxy cutting it, a daemon restarting) backs off.
            delay = 0.0 if time.monotonic() - subscribed_at > 30 else max(0.5, delay * 2)
            delay = min(delay, 30.0)
            self._post(self._on_lost, error, delay)
            self._closing.wait(delay)
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

    def _on_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        if not container_id:
            return
        seen = self.seen.pop(container_id, None) or Seen()
        self.seen[container_id] = seen
        while len(self.seen) > SEEN_EVENTS_KEPT:
            self.seen.popitem(last=False)
        action = event.get("Action") or event.get("status")
        if action == "oom":
            seen.oom = True
        elif action == "die":
            seen.died = True
            code = (actor.get("Attributes") or {}).get("exitCode")
            seen.exit_code = int(code) if code is not None and str(code).lstrip("-").isdigit() \
                else None
        for waiter in self._waiters.get(container_id, ()):
            waiter.changed.set()
