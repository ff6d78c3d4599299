"""How a run's attempt ended, in flowhand's words, and what that means for its state.

Pure functions only: the message a CRASHED state carries, and whether (and when) a crashed
attempt is retried. `Reporter` applies them; `StateWriter` writes the result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from flowhand.api.models import FlowRun
from flowhand.backends.base import EngineHooks, EngineOutcome
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
        if outcome.reason:  # what the backend knows instead (an eviction, a pod that never ran)
            text += f" {outcome.reason}"
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
