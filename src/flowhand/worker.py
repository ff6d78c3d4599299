"""The worker: sync with the pool, poll, claim, start, watch, report, recover.

`Worker.run()` is the service; `Worker.run(run_once=True)` polls once and waits for what it
claimed, which is how tests drive the loop without sleeps. The promise: every run flowhand
claims reaches a true final state or is handed back to the pool, whatever happens to the
worker, the API or the infrastructure. A local journal records each claim before it is made;
on start-up (and periodically) the worker re-attaches to infrastructure that outlived it,
reports what vanished, and hands back what it claimed but never started.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import structlog

from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient, backoff_seconds
from flowhand.api.models import (
    Deployment,
    FlowRun,
    OrchestrationResult,
    OrchestrationStatus,
    StateType,
    WorkPool,
)
from flowhand.backends.base import Backend, Handle, OutputSink, StopIntent
from flowhand.config import Config
from flowhand.errors import (
    APIError,
    APIResponseError,
    APIUnreachable,
    AuthError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    FlowhandError,
    JobConfigError,
    NotFound,
)
from flowhand.http import serve_http
from flowhand.jobs import JobBuilder
from flowhand.journal import Entry, Journal
from flowhand.metrics import Metrics
from flowhand.reporting import Ending, Outcome, Reporter
from flowhand.runlogs import RunLogs

#: The most runs one poll asks for; the server answers 422 above this.
MAX_POLL_LIMIT = 200
#: How long a claim may be told to WAIT before the run is left for a later poll.
CLAIM_WAIT_LIMIT_SECONDS = 60.0
#: Cap on the pause between failed polls.
MAX_POLL_BACKOFF_SECONDS = 60.0
#: How far back (before the previous check) a forced CANCELLED counts: covers clock skew
#: between the worker and the server.
CANCELLED_LOOKBACK = timedelta(minutes=5)
#: States in which a run still needs its worker.
ACTIVE_STATES = ["PENDING", "RUNNING", "CANCELLING"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Run:
    """What the worker knows about one run it is handling."""

    flow_run: FlowRun
    log: Any
    handle: Handle | None = None
    started_at: float | None = None
    max_run_seconds: float | None = None
    cancel_requested: bool = False
    timed_out: bool = False
    stopping: bool = False


class Worker:
    """One worker process serving one work pool with one backend."""

    def __init__(self, config: Config, client: PrefectClient, backend: Backend) -> None:
        if not config.pool:
            raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config file")
        self.config = config
        self.pool_name: str = config.pool
        self.client = client
        self.backend = backend
        self.jobs = JobBuilder(config, client, backend)
        # A burst of runs from one deployment reads it once per poll, not once per run.
        self.deployments: ReadCache[uuid.UUID, Deployment] = ReadCache(
            client.read_deployment, ttl_seconds=config.poll_interval_seconds)
        self.journal = Journal(config.state_dir)
        self.metrics = Metrics(self.pool_name, backend.pool_type)
        self.run_logs = RunLogs(client, config.name)
        self.reporter = Reporter(client, config, self.metrics, self.run_logs)
        self.pool: WorkPool | None = None
        self.log = structlog.get_logger("flowhand.worker").bind(
            pool=self.pool_name, backend=backend.pool_type, worker=config.name
        )
        self.runs: dict[uuid.UUID, Run] = {}
        self._stop = anyio.Event()
        self._drained = anyio.Event()
        self._rescheduling = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._poll_failures = 0
        self._last_reconcile = 0.0
        self._cancel_checked_at: datetime | None = None
        #: Monotonic time of the last successful poll, and why the worker is not ready, if so.
        self.last_poll_at: float | None = None
        self.unhealthy_reason: str | None = None
        #: Monotonic time the watch loop last ticked: the worker's loop is alive.
        self.last_tick_at = time.monotonic()
        #: The port the HTTP endpoint listens on, once it does.
        self.http_port: int | None = None

    # -- public surface ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self.runs)

    def free_slots(self) -> int:
        if self.config.limit is None:
            return MAX_POLL_LIMIT
        return max(0, self.config.limit - len(self.runs))

    def stop(self) -> None:
        """Stop claiming new runs at once; what happens to runs in flight is `[shutdown]`'s."""
        if not self._stop.is_set():
            self.log.info("worker.stopping", in_flight=len(self.runs),
                          mode=self.config.shutdown.mode)
        self._stop.set()
        if not self.runs:
            self._drained.set()

    async def run(self, run_once: bool = False) -> None:
        """Serve until `stop()`; with `run_once`, poll once and wait for what was claimed."""
        detached = 0
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # Probes get answers (503 "starting") while the pool cannot be read yet.
            if self.config.http.enabled:
                self.http_port = await tg.start(
                    serve_http, self.config.http.host, self.config.http.port, self.liveness,
                    self.readiness, self.metrics)
                tg.start_soon(self._tick_while_starting)
            if not await self._setup_until_ready(run_once):
                tg.cancel_scope.cancel()
                return
            self.log.info("worker.started", run_once=run_once, limit=self.config.limit,
                          work_queues=self.config.work_queues)
            tg.start_soon(self.run_logs.run)
            await self.reconcile(startup=True)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._watch_loop)
            if run_once:
                await self.poll_once()
                self.stop()
                await self._drained.wait()
            else:
                await self._poll_loop()
                await self._shutdown()
            detached = len(self.runs)
            tg.cancel_scope.cancel()
        self.log.info("worker.stopped", detached=detached)

    async def _setup_until_ready(self, run_once: bool) -> bool:
        """`setup()`, waiting out an unreachable API as a service; False if stopped first."""
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.setup()
                self.unhealthy_reason = None
                return True
            except APIError as exc:
                if run_once or isinstance(exc, AuthError):
                    raise
                delay = backoff_seconds(attempt, 1.0, 60.0)
                self.unhealthy_reason = f"cannot read work pool {self.pool_name!r}: {exc}"
                self.log.error("worker.startup_failed", error=str(exc),
                               api_url=self.client.api_url, retry_in_seconds=round(delay, 1))
                attempt += 1
                with anyio.move_on_after(delay):
                    await self._stop.wait()
        return False

    async def _tick_while_starting(self) -> None:
        # The watch loop proves liveness once running; until then this does.
        while self.pool is None:
            self.last_tick_at = time.monotonic()
            await anyio.sleep(1)

    def liveness(self) -> tuple[bool, str]:
        """/healthz: the worker's loops are turning."""
        age = time.monotonic() - self.last_tick_at
        limit = max(30.0, 10 * self.config.watch_interval_seconds)
        if age > limit:
            return False, f"the worker loop has not ticked for {age:.0f} s"
        return True, "loop alive"

    def readiness(self) -> tuple[bool, str]:
        """/readyz: the API answered a poll recently, the pool exists, the backend works."""
        if self.unhealthy_reason:
            return False, self.unhealthy_reason
        if self.last_poll_at is None:
            return False, "no successful poll yet"
        age = time.monotonic() - self.last_poll_at
        limit = max(60.0, 5 * self.config.poll_interval_seconds)
        if age > limit and not self._stop.is_set():
            return False, f"no successful poll for {age:.0f} s"
        if self._stop.is_set():
            return False, "shutting down: not claiming runs"
        return True, "polling"

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(len(self.runs))
        self.metrics.free_slots.set(self.free_slots())

    # -- startup ----------------------------------------------------------------------------

    async def setup(self) -> WorkPool:
        """Read (or create, or repair) the pool and check the configured queues exist."""
        pool = await self._sync_pool()
        missing = []
        for queue in self.config.work_queues:
            try:
                await self.client.read_work_queue(self.pool_name, queue)
            except NotFound:
                missing.append(queue)
        if missing:
            raise ConfigError(
                f"work queue(s) {', '.join(repr(q) for q in missing)} not found in pool "
                f"{self.pool_name!r}; create them (prefect work-queue create NAME --pool "
                f"{self.pool_name}) or fix work_queues"
            )
        self.pool = pool
        return pool

    async def _sync_pool(self) -> WorkPool:
        template = self.backend.default_base_job_template()
        try:
            pool = await self.client.read_work_pool(self.pool_name)
        except NotFound:
            if not self.config.create_pool:
                raise ConfigError(
                    f"work pool {self.pool_name!r} not found and create_pool is false; create it "
                    f"(prefect work-pool create {self.pool_name} --type {self.backend.pool_type})"
                ) from None
            try:
                pool = await self.client.create_work_pool(
                    self.pool_name, self.backend.pool_type, template
                )
                self.log.info("pool.created", type=self.backend.pool_type)
            except Conflict:
                pool = await self.client.read_work_pool(self.pool_name)
        if pool.type != self.backend.pool_type:
            raise ConfigError(
                f"work pool {self.pool_name!r} has type {pool.type!r} but this worker runs the "
                f"{self.backend.pool_type!r} backend; set type = {pool.type!r} (--type) or use "
                "another pool"
            )
        if not pool.base_job_template:
            await self.client.update_work_pool_template(self.pool_name, template)
            pool.base_job_template = template
            self.log.info("pool.template_filled")
        return pool

    # -- loops ------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.client.send_heartbeat(
                    self.pool_name, self.config.name, self.config.heartbeat_interval_seconds
                )
            except APIError as exc:
                self.log.warning("worker.heartbeat_failed", error=str(exc))
            await self._report_too_late()
            await anyio.sleep(self.config.heartbeat_interval_seconds)

    async def _report_too_late(self) -> None:
        """Say how many runs `max_late_seconds` keeps us from taking, so none is missed quietly."""
        if self.config.max_late_seconds is None:
            return
        cutoff = _now() - timedelta(seconds=self.config.max_late_seconds)
        body: dict[str, Any] = {
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}},
                          "next_scheduled_start_time": {"before_": cutoff.isoformat()}},
            "work_pools": {"name": {"any_": [self.pool_name]}},
        }
        if self.config.work_queues:
            body["work_pool_queues"] = {"name": {"any_": self.config.work_queues}}
        try:
            count = await self.client.count_flow_runs(body)
        except APIError as exc:
            self.log.debug("poll.late_count_failed", error=str(exc))
            return
        if count:
            self.log.warning("poll.too_late_skipped", count=count,
                             max_late_seconds=self.config.max_late_seconds,
                             hint="these runs are left alone; raise max_late_seconds to run them")

    async def _poll_loop(self) -> None:
        while not self._stop.is_set():
            delay = self.config.poll_interval_seconds
            try:
                await self.poll_once()
                if self._poll_failures:
                    self.log.info("poll.recovered", after_failures=self._poll_failures)
                self._poll_failures = 0
                self.unhealthy_reason = None
            except (APIError, BackendUnavailable) as exc:
                self.metrics.api_error(_error_kind(exc))
                self._poll_failures += 1
                delay = backoff_seconds(
                    self._poll_failures, self.config.poll_interval_seconds,
                    MAX_POLL_BACKOFF_SECONDS,
                )
                self.unhealthy_reason = self._describe_poll_error(exc)
                level = "error" if isinstance(exc, AuthError | NotFound) else "warning"
                getattr(self.log, level)(
                    "poll.failed", error=self.unhealthy_reason, failures=self._poll_failures,
                    retry_in_seconds=round(delay, 2),
                )
            with anyio.move_on_after(delay):
                await self._stop.wait()

    def _describe_poll_error(self, exc: FlowhandError) -> str:
        if isinstance(exc, AuthError):
            return (f"the API refused our credentials ({exc.status_code}): check PREFECT_API_KEY "
                    "or PREFECT_API_AUTH_STRING")
        if isinstance(exc, NotFound):
            return (f"work pool {self.pool_name!r} or one of its queues "
                    f"{self.config.work_queues or ''} no longer exists ({exc.detail})")
        return str(exc)

    async def poll_once(self) -> int:
        """Ask for due runs (at most the free slots) and start handling each; return how many."""
        free = self.free_slots()
        if free <= 0:
            self.log.debug("poll.skipped", reason="no free slots", in_flight=len(self.runs))
            return 0
        await self.backend.check()
        now = _now()
        after = (
            now - timedelta(seconds=self.config.max_late_seconds)
            if self.config.max_late_seconds is not None
            else None
        )
        started = time.monotonic()
        responses = await self.client.get_scheduled_flow_runs(
            self.pool_name,
            work_queue_names=self.config.work_queues,
            scheduled_before=now + timedelta(seconds=self.config.prefetch_seconds),
            scheduled_after=after,
            limit=min(free, MAX_POLL_LIMIT),
        )
        self.last_poll_at = time.monotonic()
        self.metrics.poll_duration.observe(self.last_poll_at - started)
        self.metrics.last_poll.set_to_current_time()
        submitted = 0
        for response in responses:
            flow_run = response.flow_run
            if flow_run.id in self.runs:
                continue
            if self.free_slots() <= 0 or self._stop.is_set():
                break
            self._spawn(self._handle_run, self._track(flow_run))
            submitted += 1
        self.log.debug("poll.done", found=len(responses), submitted=submitted,
                       duration_seconds=round(time.monotonic() - started, 4))
        return submitted

    def _track(self, flow_run: FlowRun) -> Run:
        run = Run(flow_run=flow_run, log=self.log.bind(flow_run_id=str(flow_run.id),
                                                       flow_run_name=flow_run.name))
        self.runs[flow_run.id] = run
        self._update_gauges()
        return run

    def _spawn(self, func: Any, run: Run, *args: Any) -> None:
        assert self._tg is not None, "runs are handled inside Worker.run"
        self._tg.start_soon(self._guarded, func, run, *args)

    def _stop_soon(self, run: Run) -> None:
        """Stop a run's infrastructure in the background; its own handler reports the end."""
        assert self._tg is not None
        self._tg.start_soon(self._stop_run, run)

    async def _guarded(self, func: Any, run: Run, *args: Any) -> None:
        """Run one run's handler; whatever happens, free its slot."""
        try:
            await func(run, *args)
        except Exception as exc:  # noqa: BLE001 - one run's surprise must not stop the worker
            # The journal keeps the claim, so the next reconcile pass picks the run up again.
            run.log.exception("flow_run.unexpected_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.runs.pop(run.flow_run.id, None)
            self._update_gauges()
            if not self.runs and self._stop.is_set():
                self._drained.set()

    # -- watching runs in flight --------------------------------------------------------------

    async def _watch_loop(self) -> None:
        """Cancellation requests, maximum run times and reconciliation, every few seconds."""
        while True:
            await anyio.sleep(self.config.watch_interval_seconds)
            self.last_tick_at = time.monotonic()
            try:
                await self._check_cancellations()
            except APIError as exc:
                self.log.debug("watch.failed", error=str(exc))
            self._check_run_times()
            due = time.monotonic() - self._last_reconcile >= self.config.reconcile_interval_seconds
            if due and not self._stop.is_set():
                try:
                    await self.reconcile(startup=False)
                except APIError as exc:
                    self.log.debug("reconcile.failed", error=str(exc))

    async def _check_cancellations(self) -> None:
        """Stop runs whose cancellation was asked for: CANCELLING, or forced to CANCELLED.

        Two small queries over the pool, whatever the number of runs in flight: the runs
        being cancelled, and those cancelled lately (a forced cancel skips CANCELLING).
        """
        if not any(not run.cancel_requested for run in self.runs.values()):
            return
        checked_at = _now()
        since = (self._cancel_checked_at or checked_at) - CANCELLED_LOOKBACK
        queries: list[dict[str, Any]] = [
            {"state": {"type": {"any_": ["CANCELLING"]}}},
            {"state": {"type": {"any_": ["CANCELLED"]}}, "end_time": {"after_": since.isoformat()}},
        ]
        for flow_runs_filter in queries:
            await self._stop_cancelled(flow_runs_filter)
        self._cancel_checked_at = checked_at

    async def _stop_cancelled(self, flow_runs_filter: dict[str, Any]) -> None:
        offset = 0
        while True:
            found = await self.client.read_flow_runs({
                "flow_runs": flow_runs_filter,
                "work_pools": {"name": {"any_": [self.pool_name]}},
                "sort": "ID_DESC",
                "limit": MAX_POLL_LIMIT,
                "offset": offset,
            })
            for flow_run in found:
                run = self.runs.get(flow_run.id)
                if run is None or run.cancel_requested:
                    continue
                run.cancel_requested = True
                run.log.info("flow_run.cancel_requested", state=flow_run.state_type and
                             flow_run.state_type.value, started=run.handle is not None)
                if run.handle is not None:
                    self._stop_soon(run)
            if len(found) < MAX_POLL_LIMIT:
                return
            offset += MAX_POLL_LIMIT

    def _check_run_times(self) -> None:
        now = time.monotonic()
        for run in list(self.runs.values()):
            limit = run.max_run_seconds
            if run.handle is None or run.started_at is None or limit is None or run.timed_out:
                continue
            if now - run.started_at > limit:
                run.timed_out = True
                run.log.warning("flow_run.timed_out", max_run_seconds=limit)
                self._stop_soon(run)

    async def _stop_run(self, run: Run) -> None:
        """Stop a run's infrastructure; its watcher then reports the ending."""
        if run.stopping or run.handle is None:
            return
        run.stopping = True
        run.log.info("flow_run.stopping", infrastructure_pid=run.handle.infrastructure_pid,
                     grace_seconds=self.backend.kill_grace_seconds)
        intent = (StopIntent.CANCEL if run.cancel_requested
                  else StopIntent.RESCHEDULE if self._rescheduling else None)
        try:
            await self.backend.kill(run.handle, self.backend.kill_grace_seconds, intent)
        except FlowhandError as exc:
            run.log.error("flow_run.stop_failed", error=str(exc))

    # -- one run ----------------------------------------------------------------------------

    async def _handle_run(self, run: Run) -> None:
        proceed, deployment = await self._read_deployment(run)
        if not proceed or not await self._claim(run):
            return
        # Awaited before the start rather than sent alongside it: concurrent writes to one run
        # make SQLite-backed servers answer 503 ("database is locked").
        await self._label_run(run)
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
            with anyio.CancelScope(shield=True):
                await self.reporter.deliver("cancel", lambda: self.client.set_flow_run_state(
                    flow_run.id, StateType.CANCELLED, message=message, force=True), run.log)
            run.log.warning("flow_run.cancelled", reason=message)
            return False, None

    async def _claim(self, run: Run) -> bool:
        """Propose PENDING; True only when this worker now owns the run."""
        flow_run, log = run.flow_run, run.log
        deadline = time.monotonic() + CLAIM_WAIT_LIMIT_SECONDS
        while True:
            transition_id = uuid.uuid4()
            # Written first, so a worker killed mid-claim still knows this run may be its own.
            self.journal.claiming(flow_run.id, transition_id)
            try:
                result = await self.client.set_flow_run_state(
                    flow_run.id, StateType.PENDING, transition_id=transition_id
                )
            except NotFound:
                log.info("flow_run.claim_skipped", reason="flow run was deleted")
                self.journal.forget(flow_run.id)
                return False
            except APIError as exc:
                # The proposal may have been written before the connection broke: read back.
                return await self._owns_claim(flow_run.id, transition_id, log, str(exc))
            status = result.status
            self.metrics.claim(status.value)
            if status is OrchestrationStatus.ACCEPT:
                if not await self._reopened_final_state(flow_run.id, log):
                    log.info("flow_run.claimed", outcome="ACCEPT")
                    self.metrics.run_event("claimed")
                    self.run_logs.add(flow_run.id, 20, "claimed the run")
                    return True
                self.journal.forget(flow_run.id)
                return False
            if status is OrchestrationStatus.WAIT:
                delay = result.details.delay_seconds or 1.0
                if time.monotonic() + delay > deadline:
                    log.info("flow_run.claim_released", outcome="WAIT",
                             reason=result.details.reason)
                    self.journal.forget(flow_run.id)
                    return False
                log.info("flow_run.claim_wait", outcome="WAIT", delay_seconds=delay,
                         reason=result.details.reason)
                await anyio.sleep(delay)
                continue
            if status is OrchestrationStatus.REJECT:
                # "This run has already made this state transition": a retry of a claim the
                # server had written before the answer was lost. Ours if the transition id is.
                state = result.state
                if state is None:
                    return await self._owns_claim(flow_run.id, transition_id, log, "duplicate")
                if (state.type is StateType.PENDING
                        and state.state_details.transition_id == transition_id):
                    log.info("flow_run.claimed", outcome="DUPLICATE")
                    self.metrics.run_event("claimed")
                    return True
            self._log_refused_claim(result, log)
            self.journal.forget(flow_run.id)
            return False

    async def _reopened_final_state(self, flow_run_id: uuid.UUID, log: Any) -> bool:
        """True (and the final state restored) when our PENDING re-opened a finished run.

        The server accepts PENDING from a final state whose result was not persisted. Under
        load another worker can claim, run and finish a run between our poll and our claim;
        the history then holds a final state newer than the run's last SCHEDULED state (the
        one the poll saw, or a retry's), and it is put back instead of running the flow twice.
        Timestamps are taken when a request arrives, not when it commits, so only "newer than
        the SCHEDULED state" is reliable, not the order relative to our own PENDING. (One
        read of the history after the claim settles this; a read before it would only narrow
        the window, at a request per run.)
        """
        try:
            history = await self.client.read_flow_run_states(flow_run_id)
        except APIError as exc:
            log.warning("flow_run.claim_unverified", error=str(exc))
            return False
        scheduled = [s.timestamp for s in history
                     if s.type is StateType.SCHEDULED and s.timestamp is not None]
        if not scheduled:
            return False
        since = max(scheduled)
        finished = [s for s in history if s.type.is_final and s.timestamp is not None
                    and s.timestamp > since]
        if not finished:
            return False
        previous = finished[-1]
        with anyio.CancelScope(shield=True):
            await self.reporter.deliver("restore", lambda: self.client.set_flow_run_state(
                flow_run_id, previous.type, name=previous.name, message=previous.message,
                force=True), log)
        log.warning("flow_run.claim_undone", reason="the run had already finished",
                    restored=previous.type.value)
        return True

    def _log_refused_claim(self, result: OrchestrationResult, log: Any) -> None:
        state = result.state
        log.info(
            "flow_run.claim_" + ("aborted" if result.status is OrchestrationStatus.ABORT
                                 else "rejected"),
            outcome=result.status.value,
            reason=result.details.reason,
            server_state=f"{state.type.value}/{state.name}" if state else None,
        )

    async def _owns_claim(
        self, flow_run_id: uuid.UUID, transition_id: uuid.UUID, log: Any, why: str
    ) -> bool:
        try:
            current = await self.client.read_flow_run(flow_run_id)
        except APIError as exc:
            # Unknown: the journal keeps the claim and reconciliation settles it later.
            log.warning("flow_run.claim_unknown", error=why, read_back_error=str(exc))
            return False
        state = current.state
        ours = (
            state is not None
            and state.type is StateType.PENDING
            and state.state_details.transition_id == transition_id
        )
        log.info("flow_run.claimed" if ours else "flow_run.claim_lost", outcome="READ_BACK",
                 error=why)
        if ours:
            self.metrics.run_event("claimed")
        else:
            self.journal.forget(flow_run_id)
        return ours

    async def _label_run(self, run: Run) -> None:
        """Mark the run as ours on the server, so a restarted worker finds it by name."""
        assert self.pool is not None
        labels = {
            "prefect.worker.name": self.config.name,
            "prefect.worker.type": self.backend.pool_type,
            "prefect.work-pool.name": self.pool.name,
            "prefect.work-pool.id": str(self.pool.id),
        }
        try:
            await self.client.update_flow_run_labels(run.flow_run.id, labels)
        except APIError as exc:
            run.log.warning("flow_run.labels_failed", error=str(exc))

    async def _execute(self, run: Run, deployment: Deployment | None) -> None:
        assert self.pool is not None
        flow_run, log = run.flow_run, run.log
        try:
            job = await self.jobs.build(flow_run, deployment, self.pool)
        except (JobConfigError, APIError) as exc:
            await self._end(run, Outcome(Ending.START_FAILED, reason=_describe(exc),
                                         retriable=not isinstance(exc, JobConfigError)))
            return
        run.max_run_seconds = job.max_run_seconds
        if self.config.run_logs.forward_output:
            job = dataclasses.replace(job, output_sink=self._output_sink(run))
        await self._wait_until_due(run)
        if run.cancel_requested or self._rescheduling:
            await self._end(run, Outcome(
                Ending.CANCELLED if run.cancel_requested else Ending.HANDED_BACK,
                reason="the worker is shutting down; the run had not started"))
            return

        async def record_pid(infrastructure_pid: str) -> None:
            self.journal.started(flow_run.id, infrastructure_pid)
            try:
                await self.client.set_infrastructure_pid(flow_run.id, infrastructure_pid)
            except APIError as exc:
                log.warning("flow_run.pid_not_recorded", infrastructure_pid=infrastructure_pid,
                            error=str(exc))

        try:
            handle = await self.backend.start(job, record_pid)
        except Exception as exc:  # noqa: BLE001 - any failure to start ends the run CRASHED
            if not isinstance(exc, FlowhandError):
                log.exception("flow_run.start_error")
            await self._end(run, Outcome(Ending.START_FAILED, reason=_describe(exc)))
            return
        run.handle, run.started_at = handle, time.monotonic()
        scheduled = flow_run.expected_start_time or flow_run.next_scheduled_start_time
        lateness = (_now() - scheduled).total_seconds() if scheduled else None
        if lateness is not None:
            self.metrics.lateness.observe(max(0.0, lateness))
        self.metrics.run_event("started")
        self.run_logs.add(flow_run.id, 20, f"started the run's infrastructure "
                          f"({self.backend.pool_type}, {handle.infrastructure_pid})")
        log.info("flow_run.started", infrastructure_pid=handle.infrastructure_pid,
                 command=job.command,
                 lateness_seconds=round(lateness, 3) if lateness is not None else None)
        if run.cancel_requested or self._rescheduling:
            self._stop_soon(run)
        await self._watch(run)

    def _output_sink(self, run: Run) -> OutputSink:
        """Forward the run's output to its logs, up to `[run_logs] max_output_bytes`."""
        budget = self.config.run_logs.max_output_bytes
        run_id = run.flow_run.id

        def sink(lines: list[str]) -> None:
            nonlocal budget
            for line in lines:
                if budget <= 0:
                    return
                size = len(line.encode()) + 1
                if size > budget:
                    budget = 0
                    self.run_logs.add(run_id, 30, "stopped forwarding the run's output: "
                                      f"max_output_bytes "
                                      f"({self.config.run_logs.max_output_bytes}) reached")
                    return
                budget -= size
                self.run_logs.add_output(run_id, line)

        return sink

    async def _wait_until_due(self, run: Run) -> None:
        """Runs claimed early (prefetch) start at their scheduled time, not at claim time."""
        flow_run = run.flow_run
        due = (flow_run.state.state_details.scheduled_time if flow_run.state else None) \
            or flow_run.next_scheduled_start_time or flow_run.expected_start_time
        if due is None:
            return
        delay = (due - _now()).total_seconds()
        if delay <= 0:
            return
        run.log.debug("flow_run.waiting_until_due", seconds=round(delay, 3))
        # Wake early if the run is cancelled or the worker reschedules its runs meanwhile.
        deadline = time.monotonic() + delay
        while not (run.cancel_requested or self._rescheduling):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await anyio.sleep(min(remaining, self.config.watch_interval_seconds))

    async def _watch(self, run: Run) -> None:
        """Wait for the infrastructure to end, then report how the run ended."""
        assert run.handle is not None
        exit_ = await self.backend.wait(run.handle)
        if exit_.detached:
            # The backend stopped watching a run that still runs and reports its own state.
            run.log.warning("flow_run.unwatched", reason=exit_.explanation)
            self.journal.forget(run.flow_run.id)
            return
        run.log.info("flow_run.exited", status_code=exit_.status_code)
        self.run_logs.add(run.flow_run.id, 20,
                          f"the run's infrastructure exited with status {exit_.status_code}")
        if run.cancel_requested:
            ending = Ending.CANCELLED
        elif run.timed_out:
            ending = Ending.TIMED_OUT
        elif self._rescheduling and run.stopping:
            ending = Ending.HANDED_BACK
        else:
            ending = Ending.EXITED
        reason = exit_.explanation
        if ending is Ending.TIMED_OUT:
            reason = f"Maximum run time of {run.max_run_seconds:g} s exceeded."
        elif ending is Ending.HANDED_BACK:
            reason = "the worker shut down ([shutdown] mode = reschedule) and stopped the run"
        await self._end(run, Outcome(ending, exit_.status_code, reason=reason,
                                     output_tail=tuple(exit_.output_tail),
                                     retriable=ending is not Ending.TIMED_OUT,
                                     engine_outcome=exit_.engine_outcome,
                                     hooks=exit_.hooks))

    async def _end(self, run: Run, outcome: Outcome) -> None:
        with anyio.CancelScope(shield=True):
            await self.reporter.finish(run.flow_run.id, outcome, run.log)
            self.journal.forget(run.flow_run.id)

    # -- recovery -----------------------------------------------------------------------------

    async def reconcile(self, startup: bool) -> int:
        """Take charge of runs this worker owns but is not handling; return how many.

        At start-up these are the runs in the journal and the runs on the server labelled
        with this worker's name; later, only journal entries (a run whose handler failed).
        """
        self._last_reconcile = time.monotonic()
        entries = {e.flow_run_id: e for e in self.journal.entries()}
        candidates: dict[uuid.UUID, FlowRun] = {}
        if startup:
            for flow_run in await self._owned_active_runs():
                candidates[flow_run.id] = flow_run
        for run_id, entry in entries.items():
            uid = uuid.UUID(run_id)
            if uid in candidates or uid in self.runs:
                continue
            try:
                flow_run = await self.client.read_flow_run(uid)
            except NotFound:
                self.journal.forget(run_id)
                continue
            if self._owned(flow_run, entry):
                candidates[uid] = flow_run
            else:
                self.journal.forget(run_id)
        taken = 0
        for uid, flow_run in candidates.items():
            if uid in self.runs:
                continue
            self._spawn(self._recover, self._track(flow_run), entries.get(str(uid)))
            taken += 1
        if taken:
            self.log.info("reconcile.found", runs=taken, startup=startup)
        return taken

    async def _owned_active_runs(self) -> list[FlowRun]:
        found: list[FlowRun] = []
        offset = 0
        while True:
            page = await self.client.read_flow_runs({
                "flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}},
                "work_pools": {"name": {"any_": [self.pool_name]}},
                "limit": MAX_POLL_LIMIT,
                "offset": offset,
            })
            found += [r for r in page if r.labels.get("prefect.worker.name") == self.config.name]
            if len(page) < MAX_POLL_LIMIT:
                return found
            offset += MAX_POLL_LIMIT

    def _owned(self, flow_run: FlowRun, entry: Entry) -> bool:
        state = flow_run.state
        if state is None or state.type.value not in ACTIVE_STATES:
            return False
        return (
            flow_run.labels.get("prefect.worker.name") == self.config.name
            or str(state.state_details.transition_id) == entry.transition_id
            or (entry.infrastructure_pid is not None
                and entry.infrastructure_pid == flow_run.infrastructure_pid)
        )

    async def _recover(self, run: Run, entry: Entry | None) -> None:
        flow_run, log = run.flow_run, run.log
        pid = flow_run.infrastructure_pid or (entry.infrastructure_pid if entry else None)
        if pid is None:
            if flow_run.state_type is StateType.PENDING:
                await self._end(run, Outcome(
                    Ending.HANDED_BACK,
                    reason="it was claimed but never started (the previous worker process "
                           "stopped first)"))
            else:
                await self._end(run, Outcome(Ending.VANISHED, reason="No infrastructure id was "
                                             "recorded for it."))
            return
        try:
            handle = await self.backend.reattach(pid, flow_run.id)
        except BackendUnavailable as exc:
            # Cannot tell whether it lives: leave it to the next reconcile pass.
            log.warning("flow_run.reattach_deferred", infrastructure_pid=pid, error=str(exc))
            return
        if handle is None:
            log.warning("flow_run.vanished", infrastructure_pid=pid)
            await self._end(run, Outcome(Ending.VANISHED, reason=f"It was {pid}."))
            return
        run.handle = handle
        elapsed = (_now() - flow_run.start_time).total_seconds() if flow_run.start_time else 0.0
        run.started_at = time.monotonic() - max(0.0, elapsed)
        run.max_run_seconds = self.config.max_run_seconds
        self.metrics.run_event("reattached")
        log.info("flow_run.reattached", infrastructure_pid=pid,
                 state=flow_run.state_type and flow_run.state_type.value)
        await self._watch(run)

    # -- shutdown -----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Apply `[shutdown]`: drain, detach or reschedule the runs still in flight."""
        mode: str = self.config.shutdown.mode
        if mode == "drain" and self.runs:
            grace = self.config.shutdown.grace_seconds
            self.log.info("worker.draining", in_flight=len(self.runs), grace_seconds=grace)
            with anyio.move_on_after(grace):
                await self._drained.wait()
            mode = self.config.shutdown.after_grace
        if not self.runs:
            return
        if mode == "reschedule":
            self._rescheduling = True
            self.log.info("worker.rescheduling", in_flight=len(self.runs))
            for run in list(self.runs.values()):
                self._stop_soon(run)
            await self._drained.wait()
        else:
            self.log.info("worker.detaching", in_flight=len(self.runs),
                          flow_run_ids=[str(i) for i in self.runs])


def _error_kind(exc: FlowhandError) -> str:
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, APIUnreachable):
        return "transport"
    if isinstance(exc, APIResponseError):
        return "response"
    if isinstance(exc, BackendUnavailable):
        return "backend"
    return "status"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
