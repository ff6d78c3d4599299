"""One run's life after the poll: claim it, build its job, start it when due, watch it, end it.

`RunSupervisor.handle` is the whole path of a polled run, read top to bottom; a recovered run
joins it at `watch`. Whoever wants a run stopped (the watchdog, shutdown) calls `stop_soon`
with a reason; the run's own handler reports the ending when its infrastructure exits.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import anyio

from flowhand.api.models import Deployment, StateType
from flowhand.backends.base import Handle, Job, OutputSink, StopIntent
from flowhand.clock import utcnow
from flowhand.errors import APIError, FlowhandError, JobConfigError, NotFound
from flowhand.service_loop import Backoff, retry_until
from flowhand.worker.claimer import Claimer
from flowhand.worker.context import WorkerContext
from flowhand.worker.outcomes import Ending, Outcome
from flowhand.worker.runs import Run, RunPhase, StopReason

#: How a stop reason is reported once the infrastructure has exited.
_ENDINGS = {
    StopReason.CANCEL: Ending.CANCELLED,
    StopReason.TIMEOUT: Ending.TIMED_OUT,
    StopReason.RESCHEDULE: Ending.HANDED_BACK,
}


#: What the engine is told when a run is stopped for a reason. Over its maximum run time the
#: engine relinquishes the run (exits without a state): flowhand then reports it CRASHED with
#: the limit as the reason, and runs its on_crashed hooks, instead of the engine's "aborted by a
#: termination signal".
_INTENTS = {StopReason.CANCEL: StopIntent.CANCEL, StopReason.RESCHEDULE: StopIntent.RESCHEDULE,
            StopReason.TIMEOUT: StopIntent.RELINQUISH}


class RunSupervisor:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.claimer = Claimer(ctx)

    async def handle(self, run: Run) -> None:
        """A polled run: claim it, then run it to its end."""
        proceed, deployment = await self._read_deployment(run)
        if not proceed or not await self.claimer.claim(run):
            return
        # Awaited before the start rather than sent alongside it: concurrent writes to one run
        # make SQLite-backed servers answer 503 ("database is locked").
        await self.ctx.states.label_claimed(run.id, self.ctx.require_pool(), run.log)
        await self._execute(run, deployment)

    async def _read_deployment(self, run: Run) -> tuple[bool, Deployment | None]:
        """(go on?, the run's deployment); a deleted deployment gets its run cancelled."""
        flow_run = run.flow_run
        if flow_run.deployment_id is None:
            return True, None
        try:
            return True, await self.ctx.deployments.get(flow_run.deployment_id)
        except NotFound:
            message = f"Deployment {flow_run.deployment_id} no longer exists, cancelled run."
            await self.ctx.states.set_state(flow_run.id, StateType.CANCELLED, run.log,
                                            message=message, force=True)
            run.log.warning("flow_run.cancelled", reason=message)
            return False, None

    async def _execute(self, run: Run, deployment: Deployment | None) -> None:
        ctx, flow_run, log = self.ctx, run.flow_run, run.log
        try:
            job = await ctx.jobs.build(flow_run, deployment, ctx.require_pool())
        except (JobConfigError, APIError) as exc:
            await self.end(run, Outcome(Ending.START_FAILED, reason=_describe(exc),
                                        retriable=not isinstance(exc, JobConfigError)))
            return
        run.max_run_seconds = job.max_run_seconds
        await ctx.events.submitted(job)
        if ctx.config.run_logs.forward_output:
            job = dataclasses.replace(job, output_sink=self._output_sink(run))
        run.phase = RunPhase.WAITING
        await self._wait_until_due(run)
        if run.stop_reason is not None:
            # Only a cancellation or a reschedule can come before the start.
            await self.end(run, Outcome(
                _ENDINGS[run.stop_reason],
                reason="the worker is shutting down; the run had not started"))
            return
        if not await self._still_ours(run):
            return
        handle = await self._start(run, job)
        if handle is None:
            return
        run.mark_started(handle)
        scheduled = flow_run.expected_start_time or flow_run.next_scheduled_start_time
        lateness = (utcnow() - scheduled).total_seconds() if scheduled else None
        if lateness is not None:
            ctx.metrics.lateness.observe(max(0.0, lateness))
        ctx.metrics.run_event("started")
        ctx.states.post_log(flow_run.id, 20, f"started the run's infrastructure "
                            f"({ctx.backend.pool_type}, {handle.infrastructure_pid})")
        log.info("flow_run.started", infrastructure_pid=handle.infrastructure_pid,
                 command=handle.command or job.command,
                 lateness_seconds=round(lateness, 3) if lateness is not None else None)
        if run.stop_reason is not None:
            self.stop_soon(run)
        await self.watch(run)

    async def _still_ours(self, run: Run) -> bool:
        """Self-fencing: after a long silence from the API (or a long wait since the claim),
        read the run again before starting it, and drop it when it is no longer our PENDING
        claim (the fleet handed it back meanwhile): a partitioned worker never runs it twice.
        """
        ctx = self.ctx
        half_lease = ctx.config.claim_lease_seconds / 2
        now = time.monotonic()
        quiet = now - (ctx.client.last_answer_at or 0.0)
        since_claim = now - (run.claimed_at or now)
        if quiet <= half_lease and since_claim <= half_lease:
            return True
        run.log.info("flow_run.fencing_check", api_quiet_seconds=round(quiet, 1),
                     claimed_seconds_ago=round(since_claim, 1))
        try:
            # Not bounded by the worker's stop: a draining worker still owes this answer (a
            # forced stop cancels the wait; the journal keeps the claim).
            current = await retry_until(
                lambda: ctx.client.read_flow_run(run.id), retry_on=(APIError,),
                give_up_on=(NotFound,), backoff=Backoff(1.0, 30.0))
        except NotFound:
            ctx.journal.forget(run.id)
            return False
        assert current is not None
        state = current.state
        if (state is not None and state.type is StateType.PENDING
                and state.state_details.transition_id == run.transition_id):
            return True
        ctx.metrics.run_event("fenced")
        run.log.warning("flow_run.fenced", reason="the claim was lost while the worker could "
                        "not reach the API; not starting it",
                        state=state.type.value if state else None)
        ctx.journal.forget(run.id)
        return False

    async def _start(self, run: Run, job: Job) -> Handle | None:
        ctx, log = self.ctx, run.log

        async def record_pid(infrastructure_pid: str) -> None:
            run.infrastructure_pid = infrastructure_pid
            ctx.journal.started(run.id, infrastructure_pid)
            await ctx.states.record_pid(run.id, infrastructure_pid, log)

        try:
            return await ctx.backend.start(job, record_pid)
        except Exception as exc:  # noqa: BLE001 - any failure to start ends the run CRASHED
            if not isinstance(exc, FlowhandError):
                log.exception("flow_run.start_error")
            await self.end(run, Outcome(Ending.START_FAILED, reason=_describe(exc)))
            return None

    def _output_sink(self, run: Run) -> OutputSink:
        """Forward the run's output to its logs, up to `[run_logs] max_output_bytes`."""
        states, limit = self.ctx.states, self.ctx.config.run_logs.max_output_bytes
        budget = limit
        run_id = run.id

        def sink(lines: list[str]) -> bool:
            nonlocal budget
            for line in lines:
                if budget <= 0:
                    return False
                size = len(line.encode()) + 1
                if size > budget:
                    budget = 0
                    states.post_log(run_id, 30, "stopped forwarding the run's output: "
                                    f"max_output_bytes ({limit}) reached")
                    return False
                budget -= size
                states.post_output(run_id, line)
            return True

        return sink

    async def _wait_until_due(self, run: Run) -> None:
        """Runs claimed early (prefetch) start at their scheduled time, not at claim time."""
        flow_run = run.flow_run
        due = (flow_run.state.state_details.scheduled_time if flow_run.state else None) \
            or flow_run.next_scheduled_start_time or flow_run.expected_start_time
        if due is None:
            return
        delay = (due - utcnow()).total_seconds()
        if delay <= 0:
            return
        run.log.debug("flow_run.waiting_until_due", seconds=round(delay, 3))
        # Wake early if the run is cancelled or the worker reschedules its runs meanwhile.
        with anyio.move_on_after(delay):
            await run.stop_requested.wait()

    async def watch(self, run: Run) -> None:
        """Wait for the infrastructure to end, then report how the run ended."""
        assert run.handle is not None
        ctx = self.ctx
        exit_ = await ctx.backend.wait(run.handle)
        run.phase = RunPhase.ENDING
        if exit_.detached:
            # The backend stopped watching a run that still runs and reports its own state.
            run.log.warning("flow_run.unwatched", reason=exit_.explanation)
            ctx.journal.forget(run.id)
            return
        run.log.info("flow_run.exited", status_code=exit_.status_code)
        if run.output_dropped:
            ctx.states.post_log(run.id, 30, f"{run.output_dropped} bytes of the run's output "
                                f"were dropped: {run.output_dropped_reason}")
        ctx.events.executed(run.id, run.handle.infrastructure_pid, exit_.status_code)
        ctx.states.post_log(run.id, 20,
                            f"the run's infrastructure exited with status {exit_.status_code}")
        ending = _ENDINGS[run.stop_reason] if run.stop_reason is not None else Ending.EXITED
        reason = exit_.explanation
        if ending is Ending.TIMED_OUT:
            reason = f"Maximum run time of {run.max_run_seconds:g} s exceeded."
        elif ending is Ending.HANDED_BACK:
            reason = "the worker shut down ([shutdown] mode = reschedule) and stopped the run"
        await self.end(run, Outcome(ending, exit_.status_code, reason=reason,
                                    output_tail=tuple(exit_.output_tail),
                                    retriable=ending is not Ending.TIMED_OUT,
                                    engine_outcome=exit_.engine_outcome, hooks=exit_.hooks))

    async def end(self, run: Run, outcome: Outcome) -> None:
        """Report the run's ending and drop its journal entry, even while being cancelled."""
        run.phase = RunPhase.ENDING
        with anyio.CancelScope(shield=True):
            await self.ctx.reporter.finish(run.id, outcome, run.log, run.transition_id,
                                           run.infrastructure_pid)
            self.ctx.journal.forget(run.id)

    def output_dropped(self, flow_run_id: uuid.UUID, size: int, reason: str) -> None:
        """The backend dropped some of a run's output: count it, say it once in the worker's
        log now and in the run's logs when it ends."""
        ctx = self.ctx
        ctx.metrics.output_dropped.inc(size)
        run = ctx.runs.get(flow_run_id)
        if run is None:
            return
        if not run.output_dropped:
            run.log.warning("flow_run.output_dropped", reason=reason, size=size)
        run.output_dropped += size
        run.output_dropped_reason = reason

    def stop_soon(self, run: Run) -> None:
        """Stop a run's infrastructure in the background; its handler reports the ending."""
        self.ctx.runs.start_soon(self._stop, run)

    async def _stop(self, run: Run) -> None:
        if run.phase is not RunPhase.RUNNING or run.handle is None:
            return
        run.phase = RunPhase.STOPPING
        grace = self.ctx.backend.kill_grace_seconds
        run.log.info("flow_run.stopping", infrastructure_pid=run.handle.infrastructure_pid,
                     grace_seconds=grace)
        try:
            # The engine is told why first (Prefect's attempt control), so a cancellation runs
            # the flow's on_cancellation hooks; a time-out is a plain stop.
            intent = _INTENTS.get(run.stop_reason) if run.stop_reason else None
            await self.ctx.backend.kill(run.handle, grace, intent)
        except FlowhandError as exc:
            run.log.error("flow_run.stop_failed", error=str(exc))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
