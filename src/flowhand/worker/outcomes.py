"""How a run's attempt ended, in flowhand's words, and what that means for its state.

Three words, one module between them: what the backend saw (`backends.base.Exit`, with the
engine's receipt when it sent one), why flowhand stopped the run (`backends.base.StopIntent`),
and the ending to report (`Outcome`, tagged with its `Ending`). `outcome_of` turns the first two
into the third; every message about how a run ended is built here.

Pure functions only: `Reporter` applies them; `StateWriter` writes the result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from flowhand.api.models import FlowRun
from flowhand.backends.base import EngineHooks, EngineOutcome, Exit, StopIntent
from flowhand.exitcodes import crash_message

#: The label that counts how many crashed attempts flowhand has retried for a run.
CRASH_RETRIES_LABEL = "flowhand.crash-retries"


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


#: How each stop request is reported once the infrastructure has exited.
_ENDING_OF_STOP = {
    StopIntent.CANCEL: Ending.CANCELLED,
    StopIntent.RELINQUISH: Ending.TIMED_OUT,
    StopIntent.RESCHEDULE: Ending.HANDED_BACK,
}

#: Which stop request wins when several are made: a cancellation beats a time-out, which beats
#: a reschedule.
_STOP_RANK = {StopIntent.RESCHEDULE: 1, StopIntent.RELINQUISH: 2, StopIntent.CANCEL: 3}


def overrides(new: StopIntent, current: StopIntent | None) -> bool:
    """Whether stop request `new` replaces `current` (None: no request yet)."""
    return current is None or _STOP_RANK[new] > _STOP_RANK[current]


def outcome_of(exit_: Exit, stop: StopIntent | None, max_run_seconds: float | None) -> Outcome:
    """The ending to report for infrastructure that exited, stopped by flowhand or not."""
    ending = _ENDING_OF_STOP[stop] if stop is not None else Ending.EXITED
    reason = exit_.explanation
    if ending is Ending.TIMED_OUT:
        reason = f"Maximum run time of {max_run_seconds or 0:g} s exceeded."
    elif ending is Ending.HANDED_BACK:
        reason = "the worker shut down ([shutdown] mode = reschedule) and stopped the run"
    return Outcome(ending, exit_.status_code, reason=reason, output_tail=tuple(exit_.output_tail),
                   retriable=ending is not Ending.TIMED_OUT,
                   engine_outcome=exit_.engine_outcome, hooks=exit_.hooks)


def stopped_before_start(stop: StopIntent) -> Outcome:
    """A run asked to stop while it waited for its start (only a cancellation or a reschedule
    can come before the start)."""
    return Outcome(_ENDING_OF_STOP[stop],
                   reason="the worker is shutting down; the run had not started")


def start_failed(exc: BaseException, retriable: bool = True) -> Outcome:
    """Infrastructure that could not be started (or a job that could not be built)."""
    return Outcome(Ending.START_FAILED, reason=f"{type(exc).__name__}: {exc}", retriable=retriable)


def never_started() -> Outcome:
    """A recovered run that was claimed but never started: it goes back to the pool."""
    return Outcome(Ending.HANDED_BACK, reason="it was claimed but never started (the previous "
                                              "worker process stopped first)")


def vanished(reason: str) -> Outcome:
    """A recovered run whose infrastructure cannot be found."""
    return Outcome(Ending.VANISHED, reason=reason)


def timeout_notice(max_run_seconds: float) -> str:
    """The run-log line when a run is stopped for its time limit (Prefect's engine, stopped by
    SIGTERM, reports with its own message, which does not say why)."""
    return (f"the run exceeded its maximum run time of {max_run_seconds:g} s (max_run_seconds); "
            "stopping it")


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


def retry_plan(
    flow_run: FlowRun, worker_retries: int, worker_delay_seconds: float
) -> tuple[int, int, float] | None:
    """(attempt that crashed, retries allowed, delay) when a retry is due, else None.

    The flow's own policy counts attempts as Prefect does (`run_count` against `retries`);
    attempts that never reached RUNNING are counted by flowhand's label. The worker-side
    `retry_crashed` policy applies on top, for flows without retries of their own.
    """
    done = crash_retries_done(flow_run)
    attempt = max(flow_run.run_count, done + 1)
    policy = flow_run.empirical_policy
    flow_allowed = policy.retries or 0
    allowed = max(flow_allowed, worker_retries)
    if done >= allowed or attempt > allowed:
        return None
    delay = worker_delay_seconds
    if flow_allowed >= attempt and policy.retry_delay is not None:
        raw: Any = policy.retry_delay
        if isinstance(raw, list):
            raw = raw[min(attempt - 1, len(raw) - 1)] if raw else 0
        delay = float(raw)
    return attempt, allowed, delay


def crash_retries_done(flow_run: FlowRun) -> int:
    return int(flow_run.labels.get(CRASH_RETRIES_LABEL, 0) or 0)
