"""One way to repeat work and to retry it: the loops every long-lived task of flowhand runs.

Periodic tasks (poll, heartbeat, watch) run a step, then wait an interval; a failed step waits a
growing, jittered pause instead, so a sick API is not hammered. Calls that must land (a final
state, the pool read at start-up) are retried with the same pauses until they succeed or the
caller stops. Both wake at once when their stop event is set.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from flowhand.api.retry import backoff_seconds

T = TypeVar("T")


@dataclass
class Backoff:
    """Counts consecutive failures and says how long to pause after the latest one."""

    base_seconds: float
    max_seconds: float
    failures: int = 0

    def failed(self) -> float:
        """Record a failure; the pause before the next attempt."""
        delay = backoff_seconds(self.failures, self.base_seconds, self.max_seconds)
        self.failures += 1
        return delay

    def succeeded(self) -> int:
        """Record a success; how many failures it ended."""
        failures, self.failures = self.failures, 0
        return failures


async def sleep_unless(stop: anyio.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, waking early when `stop` is set; True when stopped."""
    if stop is None:
        await anyio.sleep(seconds)
        return False
    with anyio.move_on_after(seconds):
        await stop.wait()
    return stop.is_set()


async def service_loop(
    step: Callable[[], Awaitable[None]],
    *,
    interval: float,
    retry_on: tuple[type[Exception], ...] = (),
    backoff: Backoff | None = None,
    on_failure: Callable[[Exception, float, int], None] | None = None,
    on_recovery: Callable[[int], None] | None = None,
    stop: anyio.Event | None = None,
    sleep_first: bool = False,
    wait: Callable[[float], Awaitable[bool]] | None = None,
) -> None:
    """Run `step` every `interval` seconds until `stop` is set.

    A step raising one of `retry_on` is reported through `on_failure(exc, delay, failures)` and
    the loop pauses `delay` (from `backoff`, else `interval`) instead; the first success after
    failures calls `on_recovery(failures)`. Other exceptions propagate: they are bugs. After a
    success, `wait(interval)` (True when stopped) may decide when the next step runs instead
    (the poller's wake-ups); a failure's pause is always slept in full.
    """
    backoff = backoff or Backoff(interval, interval)
    if sleep_first and await sleep_unless(stop, interval):
        return
    while stop is None or not stop.is_set():
        try:
            await step()
        except retry_on as exc:
            delay = backoff.failed()
            if on_failure is not None:
                on_failure(exc, delay, backoff.failures)
            if await sleep_unless(stop, delay):
                return
            continue
        recovered = backoff.succeeded()
        if recovered and on_recovery is not None:
            on_recovery(recovered)
        if await (wait(interval) if wait is not None else sleep_unless(stop, interval)):
            return


async def retry_until(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[Exception], ...],
    backoff: Backoff,
    on_failure: Callable[[Exception, float, int], None] | None = None,
    stop: anyio.Event | None = None,
    give_up_on: tuple[type[Exception], ...] = (),
) -> T | None:
    """`call()` until it succeeds (its result) or `stop` is set first (None).

    Exceptions in `give_up_on` propagate even when they are also in `retry_on` (an API error
    is worth retrying, refused credentials are not).
    """
    while stop is None or not stop.is_set():
        try:
            return await call()
        except give_up_on:
            raise
        except retry_on as exc:
            delay = backoff.failed()
            if on_failure is not None:
                on_failure(exc, delay, backoff.failures)
            if await sleep_unless(stop, delay):
                return None
    return None
