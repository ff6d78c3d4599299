"""The output pump: the one place that reads a run's output, for every backend.

A backend describes where its output is with an `OutputSource` (the process backend: a file
under the state directory; the Docker backend: the container's logs); the pump polls it while the
run lives, copies whole lines to flowhand's stdout (`stream_output`) and to the run's logs (the
`OutputSink`), and keeps the last lines in memory for the crash message.

Polling, not following: a follow is a thread or a stream per run. The pause between two looks
doubles while a run is quiet, so a thousand quiet runs cost a look each every few seconds.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

import anyio

from flowhand.backends.base import OutputSink


class OutputSource(Protocol):
    """Where one run's output is."""

    async def read(self, final: bool) -> bytes:
        """The output not read before, in whole lines; all that is left when `final`."""

    async def last_lines(self, count: int) -> list[str]:
        """The last `count` non-blank lines, for a run whose output nobody followed."""


def split_lines(data: bytes) -> list[str]:
    """Lines of output as text; bytes that are not UTF-8 are replaced, never fatal."""
    return data.decode("utf-8", errors="replace").splitlines()


def last_nonblank(lines: list[str], count: int) -> list[str]:
    return [line for line in lines if line.strip()][-count:] if count > 0 else []


class OutputPump:
    """Copies one run's output while it runs and keeps the tail that explains a crash."""

    def __init__(
        self,
        source: OutputSource,
        *,
        stream_output: bool,
        sink: OutputSink | None,
        tail_lines: int,
        min_seconds: float,
        max_seconds: float,
    ) -> None:
        self.source = source
        self.stream_output = stream_output
        self.sink = sink
        self.tail_lines = tail_lines
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self._recent: deque[str] = deque(maxlen=max(tail_lines, 0))

    @property
    def forwarding(self) -> bool:
        """Whether the output goes anywhere while the run lives."""
        return self.stream_output or self.sink is not None

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Copy output in the background for as long as the block runs."""
        async with anyio.create_task_group() as tg:
            if self.forwarding:
                tg.start_soon(self._follow)
            yield
            tg.cancel_scope.cancel()

    async def finish(self, tail: bool = True) -> list[str]:
        """Copy what is left; the last lines (from memory when they were followed, else read
        from the source when `tail`) for the crash message."""
        if self.forwarding:
            await self.pump(final=True)
            return list(self._recent) if self.tail_lines > 0 else []
        if not tail or self.tail_lines <= 0:
            return []
        return await self.source.last_lines(self.tail_lines)

    async def _follow(self) -> None:
        delay = self.min_seconds
        while True:
            # Sleep first: a run that ends within the first pause is read once, by `finish`.
            await anyio.sleep(delay)
            copied = await self.pump()
            delay = self.min_seconds if copied else min(delay * 2, self.max_seconds)

    async def pump(self, final: bool = False) -> int:
        """Copy new output now; return the bytes copied."""
        data = await self.source.read(final)
        if not data:
            return 0
        if self.stream_output:
            sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
            sys.stdout.flush()
        lines = split_lines(data)
        self._recent.extend(line for line in lines if line.strip())
        if self.sink is not None:
            self.sink(lines)
        return len(data)
