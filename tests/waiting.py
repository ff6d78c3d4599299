"""The one way tests wait for something to become true: `wait_for` (blocking, for tests that
drive real processes and servers) and `until` (async, inside a test's event loop). Both give up
after a time-out, naming what they waited for."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "",
             interval: float = 0.2, details: Callable[[], str] | None = None) -> float:
    """Poll `check` every `interval` s until it holds; the seconds it took. After `timeout` s,
    fail naming `what` (and `details()`, such as a worker's log tail)."""
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{what or check}{extra}")
        time.sleep(interval)
    return time.monotonic() - started


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Inside an event loop: yield until `check` holds; fail after `seconds`."""
    with anyio.fail_after(seconds):
        while not check():
            await anyio.sleep(0.01)
