"""Shutdown: what happens to runs in flight when the worker stops (`[shutdown]`).

`drain` waits up to `grace_seconds` for them to end, then applies `after_grace`; `detach`
leaves them running (a restarted worker re-attaches them); `reschedule` stops each and hands
it back to the pool for any worker to run again.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from flowhand.backends.base import StopIntent
from flowhand.worker.context import WorkerContext
from flowhand.worker.runs import Run


class Shutdown:
    def __init__(self, ctx: WorkerContext, stop_soon: Callable[[Run], None]) -> None:
        self.ctx = ctx
        self.stop_soon = stop_soon

    async def run(self) -> None:
        """Apply `[shutdown]` to the runs still in flight."""
        ctx, settings = self.ctx, self.ctx.config.shutdown
        mode: str = settings.mode
        if mode == "drain" and len(ctx.runs):
            ctx.log.info("worker.draining", in_flight=len(ctx.runs),
                         grace_seconds=settings.grace_seconds)
            with anyio.move_on_after(settings.grace_seconds):
                await ctx.runs.drained.wait()
            mode = settings.after_grace
        if not len(ctx.runs):
            return
        if mode == "reschedule":
            ctx.log.info("worker.rescheduling", in_flight=len(ctx.runs))
            for run in ctx.runs.values():
                if run.request_stop(StopIntent.RESCHEDULE) and run.handle is not None:
                    self.stop_soon(run)
            await ctx.runs.drained.wait()
        else:
            ctx.log.info("worker.detaching", in_flight=len(ctx.runs),
                         flow_run_ids=[str(r.id) for r in ctx.runs.values()])
