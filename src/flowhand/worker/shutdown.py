"""Shutdown: what happens to runs in flight when the worker stops (`[shutdown]`).

`drain` waits up to `grace_seconds` for them to end, then applies `after_grace`; `detach`
leaves them running (a restarted worker re-attaches them); `reschedule` stops each and hands
it back to the pool for any worker to run again.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import StopIntent
from flowhand.config import ShutdownConfig
from flowhand.worker.runs import Run, RunTable


class Shutdown:
    def __init__(self, settings: ShutdownConfig, runs: RunTable, log: FilteringBoundLogger,
                 stop_soon: Callable[[Run], None]) -> None:
        self.settings = settings
        self.runs = runs
        self.log = log
        self.stop_soon = stop_soon

    async def run(self) -> None:
        """Apply `[shutdown]` to the runs still in flight."""
        settings = self.settings
        mode: str = settings.mode
        if mode == "drain" and len(self.runs):
            self.log.info("worker.draining", in_flight=len(self.runs),
                         grace_seconds=settings.grace_seconds)
            with anyio.move_on_after(settings.grace_seconds):
                await self.runs.drained.wait()
            mode = settings.after_grace
        if not len(self.runs):
            return
        if mode == "reschedule":
            self.log.info("worker.rescheduling", in_flight=len(self.runs))
            for run in self.runs.values():
                if run.request_stop(StopIntent.RESCHEDULE) and run.handle is not None:
                    self.stop_soon(run)
            await self.runs.drained.wait()
        else:
            self.log.info("worker.detaching", in_flight=len(self.runs),
                         flow_run_ids=[str(r.id) for r in self.runs.values()])
