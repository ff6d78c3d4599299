"""Short-lived caches of API reads that many runs share (their deployment, their flow).

A burst of runs from one deployment would otherwise read the same deployment once per run, all
at the same moment: the server, not the worker, is what limits how fast runs start.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    """Values read through `fetch`, kept `ttl_seconds` (None: for good), one read at a time per key.

    Callers asking for a key that is being read wait for that read instead of sending their own.
    A failed read is not cached: each waiter gets the error and the next call reads again.
    """

    def __init__(self, fetch: Callable[[K], Awaitable[V]], ttl_seconds: float | None,
                 max_entries: int = 1024) -> None:
        self._fetch = fetch
        self._ttl = ttl_seconds
        self._max = max_entries
        self._values: dict[K, tuple[float, V]] = {}
        self._locks: dict[K, anyio.Lock] = {}

    def _fresh(self, key: K) -> tuple[bool, V | None]:
        entry = self._values.get(key)
        if entry is None:
            return False, None
        if self._ttl is not None and time.monotonic() - entry[0] > self._ttl:
            return False, None
        return True, entry[1]

    async def get(self, key: K) -> V:
        found, value = self._fresh(key)
        if found:
            return value  # type: ignore[return-value]
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                # Someone else may have read it while we waited for the lock.
                found, value = self._fresh(key)
                if found:
                    return value  # type: ignore[return-value]
                read_at = time.monotonic()
                value = await self._fetch(key)
                if len(self._values) >= self._max:
                    self._values.pop(next(iter(self._values)))
                self._values[key] = (read_at, value)
                return value
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)
