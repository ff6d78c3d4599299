"""The worker: sync with the pool, poll, claim, start, watch, report.

`Worker.run()` is the service; `Worker.run(run_once=True)` polls once and waits for what it
claimed, which is how tests drive the loop without sleeps. Every run flowhand claims ends in a
final state written by the flow or by flowhand; writes of final states are shielded from
cancellation so a shutdown cannot lose them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import structlog

from flowhand.api.client import PrefectClient, backoff_seconds
from flowhand.api.models import (
    Deployment,
    FlowRun,
    LogRecord,
    OrchestrationResult,
    OrchestrationStatus,
    StateType,
    WorkPool,
)
from flowhand.backends.base import Backend, Exit, Handle
from flowhand.config import Config
from flowhand.errors import (
    APIError,
    AuthError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    FlowhandError,
    JobConfigError,
    LaunchFailed,
    NotFound,
)
from flowhand.exitcodes import crash_message, resolution
from flowhand.jobs import JobBuilder

#: The most runs one poll asks for; the server answers 422 above this.
MAX_POLL_LIMIT = 200
#: How long a claim may be told to WAIT before the run is left for a later poll.
CLAIM_WAIT_LIMIT_SECONDS = 60.0
#: Cap on the pause between failed polls.
MAX_POLL_BACKOFF_SECONDS = 60.0


def _now() -> datetime:
    return datetime.now(UTC)


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
        self.pool: WorkPool | None = None
        self.log = structlog.get_logger("flowhand.worker").bind(
            pool=self.pool_name, backend=backend.pool_type, worker=config.name
        )
        self._in_flight: dict[uuid.UUID, Handle | None] = {}
        self._stop = anyio.Event()
        self._drained = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._poll_failures = 0
        #: Monotonic time of the last successful poll, and why the worker is not ready, if so.
        self.last_poll_at: float | None = None
        self.unhealthy_reason: str | None = None

    # -- public surface ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def free_slots(self) -> int:
        if self.config.limit is None:
            return MAX_POLL_LIMIT
        return max(0, self.config.limit - len(self._in_flight))

    def stop(self) -> None:
        """Stop claiming new runs; runs in flight are waited for."""
        if not self._stop.is_set():
            self.log.info("worker.stopping", in_flight=len(self._in_flight))
        self._stop.set()

    async def run(self, run_once: bool = False) -> None:
        """Serve until `stop()`; with `run_once`, poll once and wait for what was claimed."""
        await self.setup()
        self.log.info("worker.started", run_once=run_once, limit=self.config.limit,
                      work_queues=self.config.work_queues)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if run_once:
                await self._heartbeat_once()
                await self._report_too_late()
                await self.poll_once()
            else:
                tg.start_soon(self._heartbeat_loop)
                await self._poll_loop()
                # Keep heartbeating until the last run in flight has been reported.
                if self._in_flight:
                    await self._drained.wait()
                tg.cancel_scope.cancel()
        self.log.info("worker.stopped")

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

    async def _heartbeat_once(self) -> None:
        try:
            await self.client.send_heartbeat(
                self.pool_name, self.config.name, self.config.heartbeat_interval_seconds
            )
        except APIError as exc:
            self.log.warning("worker.heartbeat_failed", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat_once()
            await self._report_too_late()
            await anyio.sleep(self.config.heartbeat_interval_seconds)

    async def _report_too_late(self) -> None:
        """Say how many runs `max_late_seconds` keeps us from taking, so none is missed quietly."""
        if self.config.max_late_seconds is None:
            return
        cutoff = _now() - timedelta(seconds=self.config.max_late_seconds)
        flow_runs: dict[str, Any] = {
            "state": {"type": {"any_": ["SCHEDULED"]}},
            "next_scheduled_start_time": {"before_": cutoff.isoformat()},
        }
        body: dict[str, Any] = {"flow_runs": flow_runs,
                                "work_pools": {"name": {"any_": [self.pool_name]}}}
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
            self.log.debug("poll.skipped", reason="no free slots", in_flight=len(self._in_flight))
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
        submitted = 0
        assert self._tg is not None, "poll_once runs inside Worker.run"
        for response in responses:
            flow_run = response.flow_run
            if flow_run.id in self._in_flight:
                continue
            if self.free_slots() <= 0:
                break
            self._in_flight[flow_run.id] = None
            self._tg.start_soon(self._handle_run, flow_run)
            submitted += 1
        self.log.debug("poll.done", found=len(responses), submitted=submitted,
                       duration_seconds=round(time.monotonic() - started, 4))
        return submitted

    # -- one run ----------------------------------------------------------------------------

    async def _handle_run(self, flow_run: FlowRun) -> None:
        log = self.log.bind(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name)
        try:
            proceed, deployment = await self._read_deployment(flow_run, log)
            if not proceed or not await self._claim(flow_run, log):
                return
            await self._execute(flow_run, deployment, log)
        except Exception as exc:  # noqa: BLE001 - one run's surprise must not stop the worker
            log.exception("flow_run.unexpected_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._in_flight.pop(flow_run.id, None)
            if not self._in_flight and self._stop.is_set():
                self._drained.set()

    async def _read_deployment(
        self, flow_run: FlowRun, log: Any
    ) -> tuple[bool, Deployment | None]:
        """(go on?, the run's deployment); a deleted deployment gets its run cancelled."""
        if flow_run.deployment_id is None:
            return True, None
        try:
            return True, await self.client.read_deployment(flow_run.deployment_id)
        except NotFound:
            message = f"Deployment {flow_run.deployment_id} no longer exists, cancelled run."
            with anyio.CancelScope(shield=True):
                await self.client.set_flow_run_state(
                    flow_run.id, StateType.CANCELLED, message=message, force=True
                )
            log.warning("flow_run.cancelled", reason=message)
            return False, None

    async def _claim(self, flow_run: FlowRun, log: Any) -> bool:
        """Propose PENDING; True only when this worker now owns the run."""
        deadline = time.monotonic() + CLAIM_WAIT_LIMIT_SECONDS
        while True:
            transition_id = uuid.uuid4()
            try:
                result = await self.client.set_flow_run_state(
                    flow_run.id, StateType.PENDING, transition_id=transition_id
                )
            except NotFound:
                log.info("flow_run.claim_skipped", reason="flow run was deleted")
                return False
            except APIError as exc:
                # The proposal may have been written before the connection broke: read back.
                return await self._owns_claim(flow_run.id, transition_id, log, str(exc))
            status = result.status
            if status is OrchestrationStatus.ACCEPT:
                log.info("flow_run.claimed", outcome="ACCEPT")
                return True
            if status is OrchestrationStatus.WAIT:
                delay = result.details.delay_seconds or 1.0
                if time.monotonic() + delay > deadline:
                    log.info("flow_run.claim_released", outcome="WAIT",
                             reason=result.details.reason)
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
                    return True
            self._log_refused_claim(result, log)
            return False

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
        return ours

    async def _execute(self, flow_run: FlowRun, deployment: Deployment | None, log: Any) -> None:
        assert self.pool is not None
        try:
            job = await self.jobs.build(flow_run, deployment, self.pool)
        except (JobConfigError, APIError) as exc:
            await self._crash(flow_run.id, _submit_failure(exc), log)
            return
        await self._label_run(flow_run.id, log)

        async def record_pid(infrastructure_pid: str) -> None:
            try:
                await self.client.set_infrastructure_pid(flow_run.id, infrastructure_pid)
            except APIError as exc:
                log.warning("flow_run.pid_not_recorded", infrastructure_pid=infrastructure_pid,
                            error=str(exc))

        try:
            handle = await self.backend.start(job, record_pid)
        except (LaunchFailed, BackendUnavailable) as exc:
            await self._crash(flow_run.id, _submit_failure(exc), log)
            return
        except Exception as exc:  # noqa: BLE001 - a backend bug still ends the run CRASHED
            log.exception("flow_run.start_error")
            await self._crash(flow_run.id, _submit_failure(exc), log)
            return
        self._in_flight[flow_run.id] = handle
        log.info("flow_run.started", infrastructure_pid=handle.infrastructure_pid,
                 command=job.command)
        exit_ = await self.backend.wait(handle)
        log.info("flow_run.exited", status_code=exit_.status_code)
        with anyio.CancelScope(shield=True):
            await self._report_exit(flow_run.id, exit_, log)

    async def _label_run(self, flow_run_id: uuid.UUID, log: Any) -> None:
        assert self.pool is not None
        labels = {
            "prefect.worker.name": self.config.name,
            "prefect.worker.type": self.backend.pool_type,
            "prefect.work-pool.name": self.pool.name,
            "prefect.work-pool.id": str(self.pool.id),
        }
        try:
            await self.client.update_flow_run_labels(flow_run_id, labels)
        except APIError as exc:
            log.debug("flow_run.labels_failed", error=str(exc))

    async def _report_exit(self, flow_run_id: uuid.UUID, exit_: Exit, log: Any) -> None:
        """Make sure the run does not stay PENDING or RUNNING now that its infrastructure ended."""
        if exit_.detached:
            log.warning("flow_run.unwatched", reason=exit_.explanation)
            return
        try:
            current = await self.client.read_flow_run(flow_run_id)
        except NotFound:
            log.info("flow_run.deleted")
            return
        except APIError as exc:
            log.error("flow_run.report_failed", error=str(exc))
            return
        state_type = current.state_type
        if state_type is not None and state_type.is_final:
            log.info("flow_run.finished", state=state_type.value, status_code=exit_.status_code)
            return
        if state_type is StateType.CANCELLING:
            await self._set_final(flow_run_id, StateType.CANCELLED,
                                  "Flow run was cancelled; its infrastructure has exited.", log,
                                  force=True)
            return
        if state_type in (StateType.SCHEDULED, StateType.PAUSED):
            # Rescheduled or suspended by the flow itself: it belongs to the pool again.
            log.info("flow_run.handed_back", state=state_type.value)
            return
        code = exit_.status_code
        if code is None:
            message = "Flow run infrastructure disappeared without reporting a final state."
        elif code == 0:
            message = ("Flow run infrastructure exited with status code 0 without reporting a "
                       "final state; the flow run exited without reporting a final state.")
        else:
            message = crash_message(code, exit_.explanation)
        if exit_.output_tail:
            message += "\nLast output lines:\n" + "\n".join(exit_.output_tail)
        hint = resolution(code) if code else ""
        await self._crash(flow_run_id, message, log, status_code=code, hint=hint)

    async def _crash(
        self, flow_run_id: uuid.UUID, message: str, log: Any, **extra: Any
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._set_final(flow_run_id, StateType.CRASHED, message, log, **extra)

    async def _set_final(
        self,
        flow_run_id: uuid.UUID,
        state_type: StateType,
        message: str,
        log: Any,
        force: bool = False,
        **extra: Any,
    ) -> None:
        """Propose a final state; the server refuses it when the flow already ended itself."""
        try:
            result = await self.client.set_flow_run_state(
                flow_run_id, state_type, message=message, force=force
            )
        except NotFound:
            log.info("flow_run.deleted")
            return
        except APIError as exc:
            log.error("flow_run.report_failed", state=state_type.value, error=str(exc))
            return
        if result.status is OrchestrationStatus.ACCEPT:
            event = "flow_run.crashed" if state_type is StateType.CRASHED else "flow_run.cancelled"
            log.warning(event, message=message.split("\n", 1)[0], **extra)
            await self._post_run_log(flow_run_id, 40 if state_type is StateType.CRASHED else 20,
                                     f"flowhand worker {self.config.name!r}: {message}")
        else:
            log.info("flow_run.report_refused", proposed=state_type.value,
                     outcome=result.status.value, reason=result.details.reason)

    async def _post_run_log(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        with contextlib.suppress(APIError):
            await self.client.create_logs(
                [LogRecord(level=level, message=message, timestamp=_now(), flow_run_id=flow_run_id)]
            )


def _submit_failure(exc: BaseException) -> str:
    return f"Failed to submit flow run to infrastructure: {type(exc).__name__}: {exc}"
