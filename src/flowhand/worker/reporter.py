"""Turning "the infrastructure ended" into the right state on the server, and making it stick.

Every path that ends a run goes through `Reporter.finish`: it reads the run, leaves alone what
the flow reported itself, and otherwise writes CRASHED, a retry (AwaitingRetry), CANCELLED or a
hand-back to the pool, through the `StateWriter`. The run's task runs still PENDING or RUNNING
are closed with it, so the UI shows nothing spinning forever.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.batch import FlowRunReader
from flowhand.api.client import PrefectClient
from flowhand.api.models import FlowRun, OrchestrationStatus, StateType
from flowhand.backends.base import EngineHooks
from flowhand.clock import utcnow
from flowhand.config import RetryCrashedConfig
from flowhand.errors import APIError
from flowhand.exitcodes import resolution
from flowhand.worker.history import restore_if_reopened
from flowhand.worker.outcomes import (
    CRASH_RETRIES_LABEL,
    Ending,
    Outcome,
    crash_retries_done,
    crash_text,
    retry_plan,
)
from flowhand.worker.runs import RunReport, RunReports
from flowhand.worker.states import StateWriter

#: The state Prefect hands on_cancellation hooks.
_CANCELLING = {"type": "CANCELLING", "name": "Cancelling", "message": "Flow run was cancelled."}


class Reporter:
    """Decides and writes the state that ends a run's attempt, for one worker."""

    def __init__(self, client: PrefectClient, states: StateWriter, reports: RunReports,
                 retry_crashed: RetryCrashedConfig) -> None:
        self.states = states
        #: Where what it settled is counted and said in the run's logs (the observers).
        self.reports = reports
        self.retry_crashed = retry_crashed
        # Runs often end together (a burst, a wave of retries): their reads share a request.
        self.flow_runs = FlowRunReader(client)

    @property
    def log(self) -> FilteringBoundLogger:
        """The current run's logger, else the worker's."""
        return self.states.log

    async def finish(
        self,
        flow_run_id: uuid.UUID,
        outcome: Outcome,
        transition_id: uuid.UUID | None = None,
        infrastructure_pid: str | None = None,
    ) -> None:
        """Leave the run in a true final state, a retry, or back in the pool.

        `transition_id` is this worker's claim on the run and `infrastructure_pid` what it
        started, when known: a run PENDING under another claim, or running on infrastructure
        another worker started, is that worker's now, and nothing is reported over it.
        """
        try:
            with anyio.CancelScope(shield=True):
                await self._finish(flow_run_id, outcome, transition_id, infrastructure_pid)
        finally:
            if outcome.hooks is not None:
                with anyio.CancelScope(shield=True):
                    await outcome.hooks.release()

    async def _finish(
        self,
        flow_run_id: uuid.UUID,
        outcome: Outcome,
        transition_id: uuid.UUID | None,
        infrastructure_pid: str | None,
    ) -> None:
        if self._settled_by_engine(flow_run_id, outcome):
            return
        flow_run = await self.states.deliver(
            "read", lambda: self.flow_runs.read(flow_run_id))
        if flow_run is None:
            return
        state_type = flow_run.state_type
        if state_type is StateType.PENDING and not await self._pending_is_ours(
                flow_run, transition_id, outcome):
            return
        if (state_type in (StateType.RUNNING, StateType.CANCELLING) and flow_run.infrastructure_pid
                and flow_run.infrastructure_pid != infrastructure_pid):
            self.log.info("flow_run.running_elsewhere", status_code=outcome.status_code,
                          infrastructure_pid=flow_run.infrastructure_pid,
                          reason="another worker's infrastructure runs it now; not reported")
            return
        if state_type is not None and state_type.is_final:
            self.log.info("flow_run.finished", state=state_type.value,
                          status_code=outcome.status_code)
            self.reports.publish(RunReport(flow_run_id, counted=state_type.value.lower()))
            return
        if state_type is StateType.CANCELLING or outcome.ending is Ending.CANCELLED:
            if outcome.hooks is not None and outcome.hooks.runs_cancellation:
                # As Prefect's worker: the hooks after the kill, before CANCELLED.
                await self._run_hooks(flow_run_id, "cancellation", outcome.hooks)
            await self._end(flow_run, StateType.CANCELLED,
                            "Flow run was cancelled; flowhand stopped its infrastructure.",
                            force=True)
            return
        if state_type in (StateType.SCHEDULED, StateType.PAUSED):
            self.log.info("flow_run.handed_back", state=state_type.value, by="flow")
            return
        if outcome.ending is Ending.HANDED_BACK:
            await self.hand_back(flow_run.id, outcome.reason or "handed back by the worker")
            return
        await self._crash_or_retry(flow_run, outcome)

    def _settled_by_engine(self, flow_run_id: uuid.UUID, outcome: Outcome) -> bool:
        """True when the engine's receipt already says how the run ended: no read-back needed."""
        receipt = outcome.engine_outcome
        if receipt is None:
            return False
        if receipt.aborted:
            self.log.info("flow_run.finished", state=None, by="engine",
                          reason="orchestration aborted the attempt; the run is not ours to report")
            return True
        try:
            state_type = StateType(receipt.state_type or "")
        except ValueError:
            return False
        if state_type.is_final:
            self.log.info("flow_run.finished", state=state_type.value,
                          status_code=outcome.status_code, by="engine receipt")
            self.reports.publish(RunReport(flow_run_id, counted=state_type.value.lower()))
            return True
        if state_type is StateType.PAUSED and outcome.ending is Ending.EXITED:
            self.log.info("flow_run.handed_back", state=state_type.value, by="flow")
            return True
        return False

    async def _run_hooks(self, flow_run_id: uuid.UUID, kind: str, hooks: EngineHooks) -> None:
        """The flow's hooks get the run as the API has it, as under Prefect's worker."""
        try:
            flow_run = await self.states.client.read_flow_run_document(flow_run_id)
            if kind == "cancellation" and (flow_run.get("state") or {}).get("type") != \
                    "CANCELLING":
                # Prefect hands on_cancellation a Cancelling state whatever the run shows now.
                flow_run = {**flow_run, "state": _CANCELLING}
            await hooks.run(kind, flow_run)
        except (APIError, AttributeError) as exc:
            self.log.warning("flow_run.hooks_failed", hook=f"on_{kind}", error=str(exc))

    async def _pending_is_ours(
        self, flow_run: FlowRun, transition_id: uuid.UUID | None, outcome: Outcome
    ) -> bool:
        """False when a PENDING run is not ours to end: re-opened after it finished (its final
        state is put back), or claimed by another worker since."""
        if outcome.ending is Ending.START_FAILED:
            return True  # never started: the claim is ours and nothing else ran
        if await restore_if_reopened(self.states, flow_run.id, "exit"):
            return False
        assert flow_run.state is not None
        claim = flow_run.state.state_details.transition_id
        if transition_id is not None and claim != transition_id:
            self.log.info("flow_run.claimed_by_another", status_code=outcome.status_code,
                          reason="the run is PENDING under another worker's claim; not reported")
            return False
        return True

    async def hand_back(self, flow_run_id: uuid.UUID, why: str) -> None:
        """Give the run back to the pool (AwaitingRetry, due now) for any worker to take."""
        message = (f"flowhand worker {self.states.worker_name!r} handed this run back to the "
                   f"pool: {why}")
        result = await self.states.hand_back(flow_run_id, message)
        if result is not None:
            self.log.info("flow_run.handed_back", by="worker", reason=why)
            self.reports.publish(RunReport(flow_run_id, counted="handed_back", line=(
                30, f"handed the run back to the pool: {why}")))
            await self.states.close_task_runs(flow_run_id, StateType.CRASHED,
                                              "Flow run was handed back to the pool.")

    async def _crash_or_retry(
        self, flow_run: FlowRun, outcome: Outcome
    ) -> None:
        message = crash_text(outcome)
        plan = (retry_plan(flow_run, self.retry_crashed.max_retries,
                           self.retry_crashed.delay_seconds) if outcome.retriable else None)
        if plan is not None:
            attempt, allowed, delay = plan
            when = utcnow() + timedelta(seconds=delay)
            retry_message = (f"Attempt {attempt} crashed; retrying at {when.isoformat()} "
                             f"(crash retry {attempt} of {allowed}). {message}")
            await self.states.add_labels(
                flow_run.id, {CRASH_RETRIES_LABEL: str(crash_retries_done(flow_run) + 1)})
            result = await self.states.set_state(
                flow_run.id, StateType.SCHEDULED, name="AwaitingRetry",
                message=retry_message, scheduled_time=when)
            if result is not None and result.status is OrchestrationStatus.ACCEPT:
                self.log.warning("flow_run.retrying", attempt=attempt, retries=allowed,
                                 delay_seconds=delay, status_code=outcome.status_code,
                                 reason=message.split("\n", 1)[0])
                self.reports.publish(RunReport(flow_run.id, counted="retried",
                                               line=(30, retry_message)))
                await self.states.close_task_runs(flow_run.id, StateType.CRASHED,
                                                  f"Flow run attempt {attempt} crashed.")
                return
        hint = resolution(outcome.status_code) if outcome.status_code else ""
        crashed = await self._end(flow_run, StateType.CRASHED, message,
                                  status_code=outcome.status_code, hint=hint or None)
        if crashed and outcome.hooks is not None:
            await self._run_hooks(flow_run.id, "crashed", outcome.hooks)

    async def _end(
        self,
        flow_run: FlowRun,
        state_type: StateType,
        message: str,
        force: bool = False,
        **extra: Any,
    ) -> bool:
        """Write a final state; True when the server accepted it."""
        result = await self.states.set_state(flow_run.id, state_type, message=message,
                                             force=force)
        if result is None:
            return False
        if result.status is not OrchestrationStatus.ACCEPT:
            self.log.info("flow_run.report_refused", proposed=state_type.value,
                          outcome=result.status.value, reason=result.details.reason)
            return False
        event = "flow_run.crashed" if state_type is StateType.CRASHED else "flow_run.cancelled"
        self.log.warning(event, message=message.split("\n", 1)[0],
                         **{k: v for k, v in extra.items() if v is not None})
        self.reports.publish(RunReport(flow_run.id, counted=state_type.value.lower(), line=(
            40 if state_type is StateType.CRASHED else 20,
            f"reported the run {state_type.value}: {message}")))
        await self.states.close_task_runs(flow_run.id, state_type, message.split("\n", 1)[0])
        return True
