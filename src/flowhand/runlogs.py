"""What the worker says about a run, shown in the run's logs in the Prefect UI.

Lines are queued without waiting and sent in batches (`POST /logs/`) every couple of seconds,
so a user reading a run in the UI sees why it crashed even when the flow never started.
"""

from __future__ import annotations

import uuid

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.models import LogRecord
from flowhand.clock import utcnow
from flowhand.errors import APIError

log: FilteringBoundLogger = structlog.get_logger("flowhand.runlogs")

#: Lines kept while the API is unreachable; the oldest are dropped beyond this.
MAX_QUEUED = 10_000
BATCH = 500


class RunLogs:
    def __init__(self, client: PrefectClient, worker_name: str, interval_seconds: float = 2.0):
        self.client = client
        self.prefix = f"Worker {worker_name!r}: "
        self.interval = interval_seconds
        self._queue: list[LogRecord] = []
        self.dropped = 0

    def add(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        """A line about the run from the worker."""
        self._append(LogRecord(level=level, message=self.prefix + message,
                               timestamp=utcnow(), flow_run_id=flow_run_id))

    def add_output(self, flow_run_id: uuid.UUID, line: str) -> None:
        """A line the run's infrastructure printed."""
        self._append(LogRecord(name="flowhand.output", level=20, message=line,
                               timestamp=utcnow(), flow_run_id=flow_run_id))

    def _append(self, record: LogRecord) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._queue.pop(0)
            self.dropped += 1
        self._queue.append(record)

    async def flush(self) -> None:
        while self._queue:
            batch = self._queue[:BATCH]
            try:
                await self.client.create_logs(batch)
            except APIError as exc:
                log.debug("runlogs.flush_failed", error=str(exc), queued=len(self._queue))
                return
            del self._queue[:len(batch)]

    async def run(self) -> None:
        """Flush periodically; a final flush happens when the worker stops (shielded)."""
        try:
            while True:
                await anyio.sleep(self.interval)
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.flush()
