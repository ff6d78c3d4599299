"""Run observers: what follows from a run changing phase, written once instead of at each site.

A role moves a run on with `Run.enter(phase, event, **fields)`; every observer the worker
registered then hears it (`on_phase`), as arq's job hooks or Prefect's runner observers do:
the worker's log line, the metrics, the line in the run's logs in the Prefect UI, and the
journal. Roles say what happened; observers say it to everyone who listens.
"""

from __future__ import annotations

from typing import Any

from flowhand.events import WorkerEvents
from flowhand.journal import Journal
from flowhand.metrics import Metrics
from flowhand.worker.outcomes import timeout_notice
from flowhand.worker.runs import Run, RunObserver, RunPhase, RunReport, Transition
from flowhand.worker.states import StateWriter

#: The worker-log level of each event; events not listed are not logged by `WorkerLog`.
_LEVELS = {"claimed": "info", "started": "info", "reattached": "info", "fenced": "warning",
           "unwatched": "warning", "timed_out": "warning", "stopping": "info", "exited": "info"}


class WorkerLog:
    """The worker's structured log line `flow_run.<event>`, with the run's bound identity."""

    def on_phase(self, run: Run, change: Transition) -> None:
        level = _LEVELS.get(change.event or "")
        if level is not None:
            getattr(run.log, level)(f"flow_run.{change.event}", **change.fields)

    def on_report(self, report: RunReport) -> None:
        """Reports are logged where they are decided (their fields differ at each)."""


class RunMetrics:
    """`flowhand_flow_runs_total{event}` and the start lateness histogram."""

    _COUNTED = frozenset({"claimed", "started", "reattached", "fenced"})

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_phase(self, run: Run, change: Transition) -> None:
        if change.event not in self._COUNTED:
            return
        lateness: Any = change.fields.get("lateness_seconds")
        if change.event == "started" and lateness is not None:
            self.metrics.lateness.observe(max(0.0, float(lateness)))
        self.metrics.run_event(change.event)

    def on_report(self, report: RunReport) -> None:
        if report.counted is not None:
            self.metrics.run_event(report.counted)


class RunLogLines:
    """The lines flowhand adds to the run's own logs in the Prefect UI."""

    def __init__(self, states: StateWriter, pool_type: str) -> None:
        self.states = states
        self.pool_type = pool_type

    def on_phase(self, run: Run, change: Transition) -> None:
        post, event = self.states.post_log, change.event
        if event == "claimed":
            post(run.id, 20, "claimed the run")
        elif event == "started":
            post(run.id, 20, f"started the run's infrastructure ({self.pool_type}, "
                 f"{run.infrastructure_pid})")
        elif event == "timed_out":
            post(run.id, 40, timeout_notice(change.fields["max_run_seconds"]))
        elif event == "exited":
            if run.output_dropped:
                post(run.id, 30, f"{run.output_dropped} bytes of the run's output were "
                     f"dropped: {run.output_dropped_reason}")
            post(run.id, 20, "the run's infrastructure exited with status "
                 f"{change.fields['status_code']}")

    def on_report(self, report: RunReport) -> None:
        if report.line is not None:
            self.states.post_log(report.flow_run_id, *report.line)


class PrefectEvents:
    """Prefect's `prefect.worker.executed-flow-run` event when the infrastructure exits."""

    def __init__(self, events: WorkerEvents) -> None:
        self.events = events

    def on_phase(self, run: Run, change: Transition) -> None:
        if change.event == "exited":
            self.events.executed(run.id, run.infrastructure_pid, change.fields["status_code"])

    def on_report(self, report: RunReport) -> None:
        """Prefect's events follow the infrastructure, not the reports."""


class RunJournal:
    """The claim journal: a run this worker is done with is forgotten (a handler that failed
    leaves its entry, so reconciliation picks the run up again)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def on_phase(self, run: Run, change: Transition) -> None:
        if change.new is RunPhase.DONE:
            self.journal.forget(run.id)

    def on_report(self, report: RunReport) -> None:
        if report.forget:
            self.journal.forget(report.flow_run_id)


def standard_observers(metrics: Metrics, states: StateWriter, pool_type: str,
                       journal: Journal, events: WorkerEvents) -> list[RunObserver]:
    """The worker's observers, in the order they hear a change."""
    return [WorkerLog(), RunMetrics(metrics), PrefectEvents(events),
            RunLogLines(states, pool_type), RunJournal(journal)]
