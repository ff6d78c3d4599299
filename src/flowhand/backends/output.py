"""The output pump: the one place that reads a run's output, for every backend.

A backend describes where its output is with an `OutputSource` (the process backend: a pipe the
run holds, see `output_pipe`; the Docker backend: the container's logs); the pump reads it while
the run lives, copies whole lines to flowhand's stdout (`stream_output`) and to the run's logs
(the `OutputSink`), and keeps the last lines in memory for the crash message.

A source that can say when it is readable (`WaitableSource`, a pipe) is read when it is, and
always, forwarded or not: the run waits once its pipe is full. Other sources are polled, not
followed (a follow is a thread or a stream per run); the pause between two looks doubles while
a run is quiet, so a thousand quiet runs cost a look each every few seconds.

Output that cannot be passed on (flowhand's own stdout fails: a full disk under a redirect, a
closed pipe) is dropped, never retried into a run's way, and counted through `on_dropped`.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

import anyio

from flowhand.backends.base import OutputSink


class OutputSource(Protocol):
    """Where one run's output is."""

    async def read(self, final: bool) -> bytes:
        """The output not read before, in whole lines; all that is left when `final`."""

    async def last_lines(self, count: int) -> list[str]:
        """The last `count` non-blank lines, for a run whose output nobody followed."""


@runtime_checkable
class WaitableSource(OutputSource, Protocol):
    """A source the run waits on (a pipe): read as soon as it is readable, whatever happens to
    the output, until every writer is gone."""

    #: Every writer has gone: nothing more will come.
    eof: bool

    async def wait(self, seconds: float) -> None:
        """Return when there may be something to read, or after `seconds`."""


#: Told the bytes of output that were dropped, and why.
OnDropped = Callable[[int, str], None]
#: A read at least this large means the run writes faster than one look per `min_seconds`:
#: look again at once.
BUSY_BYTES = 256 << 10
#: How much of a chunk's end is split into lines for the crash tail: first a little, at most
#: this much.
TAIL_WINDOW_BYTES = 4 << 10
TAIL_BYTES = 64 << 10


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
        on_dropped: OnDropped | None = None,
    ) -> None:
        self.source = source
        self.stream_output = stream_output
        self.sink = sink
        self.tail_lines = tail_lines
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.on_dropped = on_dropped
        #: Bytes of output read but dropped (see the module's docstring).
        self.dropped = 0
        self._pipe = source if isinstance(source, WaitableSource) else None
        self._sink_full = False
        self._recent: deque[str] = deque(maxlen=max(tail_lines, 0))

    @property
    def forwarding(self) -> bool:
        """Whether the output goes anywhere while the run lives."""
        return self.stream_output or self.sink is not None

    @property
    def reads_along(self) -> bool:
        """Whether the output is read while the run lives: it goes somewhere, or the run waits
        for it to be read."""
        return self.forwarding or self._pipe is not None

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Copy output in the background for as long as the block runs."""
        async with anyio.create_task_group() as tg:
            if self.reads_along:
                tg.start_soon(self._follow)
            yield
            tg.cancel_scope.cancel()

    async def finish(self, tail: bool = True) -> list[str]:
        """Copy what is left; the last lines (from memory when they were followed, else read
        from the source when `tail`) for the crash message."""
        if self.reads_along:
            await self.pump(final=True)
            return list(self._recent) if self.tail_lines > 0 else []
        if not tail or self.tail_lines <= 0:
            return []
        return await self.source.last_lines(self.tail_lines)

    async def _follow(self) -> None:
        if self._pipe is not None:
            await self._follow_pipe(self._pipe)
            return
        delay = self.min_seconds
        while True:
            # Sleep first: a run that ends within the first pause is read once, by `finish`.
            await anyio.sleep(delay)
            copied = await self.pump()
            delay = self.min_seconds if copied else min(delay * 2, self.max_seconds)

    async def _follow_pipe(self, pipe: WaitableSource) -> None:
        while not pipe.eof:
            await pipe.wait(self.max_seconds)
            copied = await self.pump()
            if copied < BUSY_BYTES:
                # Let a chatty run's lines gather: one look per min_seconds at most, unless
                # the last one came back large (then the run would soon wait on a full pipe).
                await anyio.sleep(self.min_seconds)

    async def pump(self, final: bool = False) -> int:
        """Copy new output now; return the bytes copied."""
        data = await self.source.read(final)
        if not data:
            return 0
        if self.stream_output:
            self._to_stdout(data)
        if self.sink is not None and not self._sink_full:
            # A sink that wants no more (its budget spent) costs no more line splitting.
            self._sink_full = self.sink(split_lines(data)) is False
        self._remember(data)
        return len(data)

    def _to_stdout(self, data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            self.drop(len(data), f"flowhand's standard output failed: {reason}")

    def drop(self, size: int, reason: str) -> None:
        """Count `size` bytes of output as dropped, for `reason`."""
        self.dropped += size
        if self.on_dropped is not None:
            self.on_dropped(size, reason)

    def _remember(self, data: bytes) -> None:
        """Keep the last non-blank lines, splitting only the chunk's end (widened until it holds
        enough lines): the tail costs the same however much the run printed."""
        if self.tail_lines <= 0:
            return
        window = TAIL_WINDOW_BYTES
        while True:
            lines = split_lines(data[-window:])
            if window < len(data) and lines:
                lines = lines[1:]  # cut mid-line
            found = last_nonblank(lines, self.tail_lines)
            if len(found) >= self.tail_lines or window >= min(len(data), TAIL_BYTES):
                break
            window *= 4
        self._recent.extend(found)
