"""What /healthz and /readyz answer: the worker's loops turn, and it can serve its pool."""

from __future__ import annotations

import time

import anyio


class Health:
    """Liveness and readiness, from marks the worker's loops leave as they go."""

    def __init__(self, poll_interval_seconds: float, watch_interval_seconds: float,
                 stop: anyio.Event) -> None:
        self.poll_interval_seconds = poll_interval_seconds
        self.watch_interval_seconds = watch_interval_seconds
        self._stop = stop
        #: Monotonic time of the last successful poll.
        self.last_poll_at: float | None = None
        #: Why the worker cannot serve its pool right now, if so.
        self.unhealthy_reason: str | None = None
        #: Why the worker does not claim runs though it could reach its pool (no room in
        #: state_dir), if so.
        self.paused_reason: str | None = None
        #: Monotonic time a loop of the worker last ticked: the worker is alive.
        self.last_tick_at = time.monotonic()

    def tick(self) -> None:
        self.last_tick_at = time.monotonic()

    def polled(self) -> float:
        """Mark a successful poll; its time."""
        self.last_poll_at = time.monotonic()
        return self.last_poll_at

    def liveness(self) -> tuple[bool, str]:
        """/healthz: the worker's loops are turning."""
        age = time.monotonic() - self.last_tick_at
        limit = max(30.0, 10 * self.watch_interval_seconds)
        if age > limit:
            return False, f"the worker loop has not ticked for {age:.0f} s"
        return True, "loop alive"

    def readiness(self) -> tuple[bool, str]:
        """/readyz: the API answered a poll recently, the pool exists, the backend works."""
        if self.unhealthy_reason:
            return False, self.unhealthy_reason
        if self.paused_reason:
            return False, self.paused_reason
        if self.last_poll_at is None:
            return False, "no successful poll yet"
        age = time.monotonic() - self.last_poll_at
        limit = max(60.0, 5 * self.poll_interval_seconds)
        if age > limit and not self._stop.is_set():
            return False, f"no successful poll for {age:.0f} s"
        if self._stop.is_set():
            return False, "shutting down: not claiming runs"
        return True, "polling"
