"""Turning "the infrastructure ended" into the right state on the server, and making it stick.

Every path that ends a run goes through `Reporter.finish`: it reads the run, leaves alone what
the flow reported itself, and otherwise writes CRASHED, a retry (AwaitingRetry), CANCELLED or a
hand-back to the pool. Writes are retried through API outages until they land, and the run's
task runs still PENDING or RUNNING are closed with it, so the UI shows nothing spinning forever.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio

from flowhand.api.batch import FlowRunReader
from flowhand.api.client import PrefectClient, backoff_seconds
from flowhand.api.models import FlowRun, OrchestrationStatus, StateType
from flowhand.backends.base import EngineHooks, EngineOutcome
from flowhand.config import Config
from flowhand.errors import APIError, NotFound
from flowhand.exitcodes import crash_message, resolution
from flowhand.metrics import Metrics
from flowhand.runlogs import RunLogs

T = TypeVar("T")

#: The label that counts how many crashed attempts flowhand has retried for a run.
CRASH_RETRIES_LABEL = "flowhand.crash-retries"
#: Pause cap while a final state cannot be delivered (API outage).
MAX_DELIVERY_BACKOFF_SECONDS = 30.0


class Ending(enum.Enum):
    """Why flowhand is ending a run's attempt."""

    EXITED = "exited"              # the infrastructure exited by itself
    START_FAILED = "start_failed"  # it could not be started
    VANISHED = "vanished"          # it disappeared while nobody watched (worker restart)
    TIMED_OUT = "timed_out"        # it exceeded the maximum run time and was stopped
    CANCELLED = "cancelled"        # it was stopped because the run is being cancelled
    HANDED_BACK = "handed_back"    # the worker is giving the run back (shutdown, never started)


@dataclass
class Outcome:
    ending: Ending
    status_code: int | None = None
    #: Why, in a user's words: a launch error, an OOM explanation, a time limit.
    reason: str | None = None
    output_tail: tuple[str, ...] = ()
    #: Whether a retry could help (a bad job template cannot be fixed by trying again).
    retriable: bool = True
    #: The engine's own report of how it concluded (attempt-control receipt), when it sent one.
    engine_outcome: EngineOutcome | None = None
    #: The flow's hooks the worker runs itself (on_crashed after a killed engine, ...).
    hooks: EngineHooks | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def crash_text(outcome: Outcome) -> str:
    """The CRASHED message for an outcome, in Prefect's form where Prefect has one."""
    code = outcome.status_code
    if outcome.ending is Ending.START_FAILED:
        text = f"Failed to submit flow run to infrastructure: {outcome.reason}"
    elif outcome.ending is Ending.VANISHED:
        text = ("Flow run infrastructure disappeared while the worker was not watching; its exit "
                "status is unknown.")
        if outcome.reason:
            text += f" {outcome.reason}"
    elif outcome.ending is Ending.TIMED_OUT:
        text = f"Flow run exceeded its maximum run time and was stopped. {outcome.reason or ''}"
    elif code is None:
        text = ("Flow run infrastructure exited without reporting a final state; exit status "
                "unknown.")
    elif code == 0:
        text = ("Flow run infrastructure exited with status code 0 without reporting a final "
                "state; the flow run exited without reporting a final state.")
    else:
        text = crash_message(code, outcome.reason)
    if outcome.output_tail:
        text += "\nLast output lines:\n" + "\n".join(outcome.output_tail)
    return text.strip()


def retry_plan(flow_run: FlowRun, config: Config) -> tuple[int, int, float] | None:
    """(attempt that crashed, retries allowed, delay) when a retry is due, else None.

    The flow's own policy counts attempts as Prefect does (`run_count` against `retries`);
    attempts that never reached RUNNING are counted by flowhand's label. The worker-side
    `retry_crashed` policy applies on top, for flows without retries of their own.
    """
    done = int(flow_run.labels.get(CRASH_RETRIES_LABEL, 0) or 0)
    attempt = max(flow_run.run_count, done + 1)
    policy = flow_run.empirical_policy
    flow_allowed = policy.retries or 0
    worker_allowed = config.retry_crashed.max_retries
    allowed = max(flow_allowed, worker_allowed)
    if done >= allowed or attempt > allowed:
        return None
    delay: float = config.retry_crashed.delay_seconds
    if flow_allowed >= attempt and policy.retry_delay is not None:
        raw: Any = policy.retry_delay
        if isinstance(raw, list):
            raw = raw[min(attempt - 1, len(raw) - 1)] if raw else 0
        delay = float(raw)
    return attempt, allowed, delay


class Reporter:
    """Writes the states that end a run's attempt, for one worker."""

    def __init__(
        self, client: PrefectClient, config: Config, metrics: Metrics, run_logs: RunLogs
    ) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self.run_logs = run_logs
        # Runs often end together (a burst, a wave of retries): their reads share a request.
        self.flow_runs = FlowRunReader(client)

    async def deliver(self, what: str, call: Callable[[], Awaitable[T]], log: Any) -> T | None:
        """Run `call` until it succeeds; None when the run is gone. Callers shield this."""
        attempt = 0
        while True:
            try:
                return await call()
            except NotFound:
                log.info("flow_run.deleted", during=what)
                return None
            except APIError as exc:
                delay = backoff_seconds(attempt, 1.0, MAX_DELIVERY_BACKOFF_SECONDS)
                log.warning("flow_run.report_delayed", during=what, error=str(exc),
                            retry_in_seconds=round(delay, 2))
                attempt += 1
                await anyio.sleep(delay)

    async def finish(self, flow_run_id: uuid.UUID, outcome: Outcome, log: Any) -> None:
        """Leave the run in a true final state, a retry, or back in the pool."""
        try:
            await self._finish(flow_run_id, outcome, log)
        finally:
            if outcome.hooks is not None:
                with anyio.CancelScope(shield=True):
                    await outcome.hooks.release()

    async def _finish(self, flow_run_id: uuid.UUID, outcome: Outcome, log: Any) -> None:
        with anyio.CancelScope(shield=True):
            if self._settled_by_engine(outcome, log):
                return
            flow_run = await self.deliver(
                "read", lambda: self.flow_runs.read(flow_run_id), log)
            if flow_run is None:
                return
            state_type = flow_run.state_type
            if state_type is not None and state_type.is_final:
                log.info("flow_run.finished", state=state_type.value,
                         status_code=outcome.status_code)
                self.metrics.run_event(state_type.value.lower())
                return
            if state_type is StateType.CANCELLING or outcome.ending is Ending.CANCELLED:
                if outcome.hooks is not None and outcome.hooks.runs_cancellation:
                    # As Prefect's worker: the hooks after the kill, before CANCELLED.
                    await self._run_hooks(flow_run_id, "cancellation", outcome.hooks, log)
                await self._end(flow_run, StateType.CANCELLED,
                                "Flow run was cancelled; flowhand stopped its infrastructure.",
                                log, force=True)
                return
            if state_type in (StateType.SCHEDULED, StateType.PAUSED):
                log.info("flow_run.handed_back", state=state_type.value, by="flow")
                return
            if outcome.ending is Ending.HANDED_BACK:
                await self.hand_back(flow_run, outcome.reason or "handed back by the worker", log)
                return
            await self._crash_or_retry(flow_run, outcome, log)

    def _settled_by_engine(self, outcome: Outcome, log: Any) -> bool:
        """True when the engine's receipt already says how the run ended: no read-back needed."""
        receipt = outcome.engine_outcome
        if receipt is None:
            return False
        if receipt.aborted:
            log.info("flow_run.finished", state=None, by="engine",
                     reason="orchestration aborted the attempt; the run is not ours to report")
            return True
        try:
            state_type = StateType(receipt.state_type or "")
        except ValueError:
            return False
        if state_type.is_final:
            log.info("flow_run.finished", state=state_type.value, status_code=outcome.status_code,
                     by="engine receipt")
            self.metrics.run_event(state_type.value.lower())
            return True
        if state_type is StateType.PAUSED and outcome.ending is Ending.EXITED:
            log.info("flow_run.handed_back", state=state_type.value, by="flow")
            return True
        return False

    async def _crash_or_retry(self, flow_run: FlowRun, outcome: Outcome, log: Any) -> None:
        message = crash_text(outcome)
        plan = retry_plan(flow_run, self.config) if outcome.retriable else None
        if plan is not None:
            attempt, allowed, delay = plan
            when = _now() + timedelta(seconds=delay)
            retry_message = (f"Attempt {attempt} crashed; retrying at {when.isoformat()} "
                             f"(crash retry {attempt} of {allowed}). {message}")
            done = int(flow_run.labels.get(CRASH_RETRIES_LABEL, 0) or 0)
            await self.deliver("label", lambda: self.client.update_flow_run_labels(
                flow_run.id, {CRASH_RETRIES_LABEL: str(done + 1)}), log)
            result = await self.deliver("retry", lambda: self.client.set_flow_run_state(
                flow_run.id, StateType.SCHEDULED, name="AwaitingRetry", message=retry_message,
                scheduled_time=when), log)
            if result is not None and result.status is OrchestrationStatus.ACCEPT:
                self.metrics.run_event("retried")
                log.warning("flow_run.retrying", attempt=attempt, retries=allowed,
                            delay_seconds=delay, status_code=outcome.status_code,
                            reason=message.split("\n", 1)[0])
                await self.post_log(flow_run.id, 30, retry_message)
                await self.close_task_runs(flow_run.id, StateType.CRASHED,
                                           f"Flow run attempt {attempt} crashed.", log)
                return
        hint = resolution(outcome.status_code) if outcome.status_code else ""
        crashed = await self._end(flow_run, StateType.CRASHED, message, log,
                                  status_code=outcome.status_code, hint=hint or None)
        if crashed and outcome.hooks is not None:
            await self._run_hooks(flow_run.id, "crashed", outcome.hooks, log)

    async def _run_hooks(self, flow_run_id: uuid.UUID, kind: str, hooks: EngineHooks,
                         log: Any) -> None:
        """The flow's hooks get the run as the API has it, as under Prefect's worker."""
        try:
            response = await self.client.request("GET", f"/flow_runs/{flow_run_id}")
            flow_run = response.json()
            if kind == "cancellation" and (flow_run.get("state") or {}).get("type") != \
                    "CANCELLING":
                # Prefect hands on_cancellation a Cancelling state whatever the run shows now.
                flow_run["state"] = {"type": "CANCELLING", "name": "Cancelling",
                                     "message": "Flow run was cancelled."}
            await hooks.run(kind, flow_run)
        except (APIError, ValueError, AttributeError) as exc:
            log.warning("flow_run.hooks_failed", hook=f"on_{kind}", error=str(exc))

    async def hand_back(self, flow_run: FlowRun, why: str, log: Any) -> None:
        """Give the run back to the pool (AwaitingRetry, due now) for any worker to take."""
        message = f"flowhand worker {self.config.name!r} handed this run back to the pool: {why}"
        result = await self.deliver("hand_back", lambda: self.client.set_flow_run_state(
            flow_run.id, StateType.SCHEDULED, name="AwaitingRetry", message=message,
            scheduled_time=_now(), force=True), log)
        if result is not None:
            self.metrics.run_event("handed_back")
            log.info("flow_run.handed_back", by="worker", reason=why)
            await self.post_log(flow_run.id, 30, f"handed the run back to the pool: {why}")
            await self.close_task_runs(flow_run.id, StateType.CRASHED,
                                       "Flow run was handed back to the pool.", log)

    async def _end(
        self,
        flow_run: FlowRun,
        state_type: StateType,
        message: str,
        log: Any,
        force: bool = False,
        **extra: Any,
    ) -> bool:
        """Write a final state; True when the server accepted it."""
        result = await self.deliver(
            state_type.value.lower(),
            lambda: self.client.set_flow_run_state(
                flow_run.id, state_type, message=message, force=force),
            log,
        )
        if result is None:
            return False
        if result.status is not OrchestrationStatus.ACCEPT:
            log.info("flow_run.report_refused", proposed=state_type.value,
                     outcome=result.status.value, reason=result.details.reason)
            return False
        event = "flow_run.crashed" if state_type is StateType.CRASHED else "flow_run.cancelled"
        self.metrics.run_event(state_type.value.lower())
        log.warning(event, message=message.split("\n", 1)[0],
                    **{k: v for k, v in extra.items() if v is not None})
        await self.post_log(flow_run.id, 40 if state_type is StateType.CRASHED else 20,
                            f"reported the run {state_type.value}: {message}")
        await self.close_task_runs(flow_run.id, state_type, message.split("\n", 1)[0], log)
        return True

    async def close_task_runs(
        self, flow_run_id: uuid.UUID, state_type: StateType, message: str, log: Any
    ) -> None:
        """Set the run's task runs still PENDING or RUNNING to `state_type`."""
        body = {
            "task_runs": {"flow_run_id": {"any_": [str(flow_run_id)]},
                          "state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
            "limit": 200,
            "page": 1,
        }
        closed = 0
        # Each pass closes what page 1 shows, so page 1 is always the next batch; bounded.
        for _ in range(100):
            try:
                response = await self.client.request("POST", "/task_runs/paginate", json=body)
                results = response.json().get("results", [])
            except (APIError, ValueError, AttributeError) as exc:
                log.warning("flow_run.task_runs_not_closed", error=str(exc))
                return
            if not results:
                break
            for task_run in results:
                try:
                    await self.client.request(
                        "POST", f"/task_runs/{task_run['id']}/set_state",
                        json={"state": {"type": state_type.value, "message": message},
                              "force": True},
                    )
                    closed += 1
                except APIError as exc:
                    log.warning("flow_run.task_runs_not_closed", error=str(exc))
                    return
        if closed:
            log.info("flow_run.task_runs_closed", count=closed, state=state_type.value)

    async def post_log(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        """Queue a line for the run's logs in the Prefect UI."""
        self.run_logs.add(flow_run_id, level, message)
