"""One run's life after the poll: claim it, build its job, start it when due, watch it, end it.

`RunSupervisor.handle` is the whole path of a polled run, read top to bottom; a recovered run
joins it at `watch`. Whoever wants a run stopped (the watchdog, shutdown) calls `stop_soon`
with a reason; the run's own handler reports the ending when its infrastructure exits.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable

import anyio

from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient
from flowhand.api.models import Deployment, StateType, WorkPool
from flowhand.backends.base import Backend, Handle, Job, OutputSink
from flowhand.clock import utcnow
from flowhand.config import Config
from flowhand.errors import APIError, FlowhandError, JobConfigError, NotFound
from flowhand.events import WorkerEvents
from flowhand.jobs import JobBuilder
from flowhand.journal import Journal
from flowhand.metrics import Metrics
from flowhand.service_loop import Backoff, retry_until
from flowhand.worker.claimer import Claimer
from flowhand.worker.outcomes import Outcome, outcome_of, start_failed, stopped_before_start
from flowhand.worker.reporter import Reporter
from flowhand.worker.runs import Run, RunPhase, RunTable
from flowhand.worker.states import StateWriter


class RunSupervisor:
    def __init__(self, *, config: Config, client: PrefectClient, backend: Backend,
                 runs: RunTable, states: StateWriter, reporter: Reporter, journal: Journal,
                 metrics: Metrics, deployments: ReadCache[uuid.UUID, Deployment],
                 jobs: JobBuilder, events: WorkerEvents, pool: Callable[[], WorkPool]) -> None:
        self.config = config
        self.client = client
        self.backend = backend
        self.runs = runs
        self.states = states
        self.reporter = reporter
        self.journal = journal
        self.metrics = metrics
        #: A burst of runs from one deployment reads it once per poll, not once per run.
        self.deployments = deployments
        self.jobs = jobs
        self.events = events
        #: The pool as read at start-up (runs are handled only after it is).
        self.pool = pool
        self.claimer = Claimer(client, states, journal, metrics)

    async def handle(self, run: Run) -> None:
        """A polled run: claim it, then run it to its end."""
        proceed, deployment = await self._read_deployment(run)
        if not proceed or not await self.claimer.claim(run):
            return
        # Awaited before the start rather than sent alongside it: concurrent writes to one run
        # make SQLite-backed servers answer 503 ("database is locked").
        await self.states.label_claimed(run.id, self.pool(), run.log)
        await self._execute(run, deployment)

    async def _read_deployment(self, run: Run) -> tuple[bool, Deployment | None]:
        """(go on?, the run's deployment); a deleted deployment gets its run cancelled."""
        flow_run = run.flow_run
        if flow_run.deployment_id is None:
            return True, None
        try:
            return True, await self.deployments.get(flow_run.deployment_id)
        except NotFound:
            message = f"Deployment {flow_run.deployment_id} no longer exists, cancelled run."
            await self.states.set_state(flow_run.id, StateType.CANCELLED, run.log,
                                            message=message, force=True)
            run.log.warning("flow_run.cancelled", reason=message)
            return False, None

    async def _execute(self, run: Run, deployment: Deployment | None) -> None:
        flow_run = run.flow_run
        try:
            job = await self.jobs.build(flow_run, deployment, self.pool())
        except (JobConfigError, APIError) as exc:
            await self.end(run, start_failed(exc, retriable=not isinstance(exc, JobConfigError)))
            return
        run.max_run_seconds = job.max_run_seconds
        await self.events.submitted(job)
        if self.config.run_logs.forward_output:
            job = dataclasses.replace(job, output_sink=self._output_sink(run))
        run.enter(RunPhase.WAITING)
        await self._wait_until_due(run)
        if run.stop_intent is not None:
            await self.end(run, stopped_before_start(run.stop_intent))
            return
        if not await self._still_ours(run):
            return
        handle = await self._start(run, job)
        if handle is None:
            return
        scheduled = flow_run.expected_start_time or flow_run.next_scheduled_start_time
        lateness = (utcnow() - scheduled).total_seconds() if scheduled else None
        run.mark_started(handle, event="started", infrastructure_pid=handle.infrastructure_pid,
                         command=job.command,
                         lateness_seconds=round(lateness, 3) if lateness is not None else None)
        if run.stop_intent is not None:
            self.stop_soon(run)
        await self.watch(run)

    async def _still_ours(self, run: Run) -> bool:
        """Self-fencing: after a long silence from the API (or a long wait since the claim),
        read the run again before starting it, and drop it when it is no longer our PENDING
        claim (the fleet handed it back meanwhile): a partitioned worker never runs it twice.
        """
        half_lease = self.config.claim_lease_seconds / 2
        now = time.monotonic()
        quiet = now - (self.client.last_answer_at or 0.0)
        since_claim = now - (run.claimed_at or now)
        if quiet <= half_lease and since_claim <= half_lease:
            return True
        run.log.info("flow_run.fencing_check", api_quiet_seconds=round(quiet, 1),
                     claimed_seconds_ago=round(since_claim, 1))
        try:
            # Not bounded by the worker's stop: a draining worker still owes this answer (a
            # forced stop cancels the wait; the journal keeps the claim).
            current = await retry_until(
                lambda: self.client.read_flow_run(run.id), retry_on=(APIError,),
                give_up_on=(NotFound,), backoff=Backoff(1.0, 30.0))
        except NotFound:
            run.enter(RunPhase.DONE)
            return False
        assert current is not None
        state = current.state
        if (state is not None and state.type is StateType.PENDING
                and state.state_details.transition_id == run.transition_id):
            return True
        run.enter(RunPhase.DONE, "fenced", reason="the claim was lost while the worker could not "
                  "reach the API; not starting it", state=state.type.value if state else None)
        return False

    async def _start(self, run: Run, job: Job) -> Handle | None:
        log = run.log

        async def record_pid(infrastructure_pid: str) -> None:
            run.infrastructure_pid = infrastructure_pid
            self.journal.started(run.id, infrastructure_pid)
            await self.states.record_pid(run.id, infrastructure_pid, log)

        try:
            return await self.backend.start(job, record_pid)
        except Exception as exc:  # noqa: BLE001 - any failure to start ends the run CRASHED
            if not isinstance(exc, FlowhandError):
                log.exception("flow_run.start_error")
            await self.end(run, start_failed(exc))
            return None

    def _output_sink(self, run: Run) -> OutputSink:
        """Forward the run's output to its logs, up to `[run_logs] max_output_bytes`."""
        states, limit = self.states, self.config.run_logs.max_output_bytes
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
        exit_ = await self.backend.wait(run.handle)
        if exit_.detached:
            # The backend stopped watching a run that still runs and reports its own state.
            run.enter(RunPhase.DONE, "unwatched", reason=exit_.explanation)
            return
        run.enter(RunPhase.ENDING, "exited", status_code=exit_.status_code)
        await self.end(run, outcome_of(exit_, run.stop_intent, run.max_run_seconds))

    async def end(self, run: Run, outcome: Outcome) -> None:
        """Report the run's ending and drop its journal entry, even while being cancelled."""
        if run.phase is not RunPhase.ENDING:
            run.enter(RunPhase.ENDING)
        with anyio.CancelScope(shield=True):
            await self.reporter.finish(run.id, outcome, run.log, run.transition_id,
                                           run.infrastructure_pid)
            run.enter(RunPhase.DONE)

    def output_dropped(self, flow_run_id: uuid.UUID, size: int, reason: str) -> None:
        """The backend dropped some of a run's output: count it, say it once in the worker's
        log now and in the run's logs when it ends."""
        self.metrics.output_dropped.inc(size)
        run = self.runs.get(flow_run_id)
        if run is None:
            return
        if not run.output_dropped:
            run.log.warning("flow_run.output_dropped", reason=reason, size=size)
        run.output_dropped += size
        run.output_dropped_reason = reason

    def stop_soon(self, run: Run) -> None:
        """Stop a run's infrastructure in the background; its handler reports the ending."""
        self.runs.start_soon(self._stop, run)

    async def _stop(self, run: Run) -> None:
        if run.phase is not RunPhase.RUNNING or run.handle is None:
            return
        grace = self.backend.kill_grace_seconds
        run.enter(RunPhase.STOPPING, "stopping", infrastructure_pid=run.handle.infrastructure_pid,
                  grace_seconds=grace)
        try:
            # The engine is told why first (Prefect's attempt control): a cancellation runs the
            # flow's on_cancellation hooks; over its time limit it relinquishes the run, which
            # flowhand reports CRASHED with the limit, running its on_crashed hooks.
            await self.backend.kill(run.handle, grace, run.stop_intent)
        except FlowhandError as exc:
            run.log.error("flow_run.stop_failed", error=str(exc))
