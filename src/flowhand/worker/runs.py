"""The runs a worker is handling: one record per run, its phase, and the table of them all.

A run's life is an explicit phase (claiming, waiting until due, running, stopping) plus, once
anyone asks for it to stop, the reason why (a `StopIntent`). The reason decides how the run is
reported when its infrastructure exits: a cancellation beats a time-out, which beats a
reschedule.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.api.models import FlowRun
from flowhand.backends.base import Handle, StopIntent
from flowhand.config import Config
from flowhand.logs import run_logging
from flowhand.metrics import Metrics
from flowhand.worker.outcomes import overrides

#: The most runs one poll asks for; the server answers 422 above this.
MAX_POLL_LIMIT = 200


class RunPhase(enum.Enum):
    """Where a run is in its life under this worker."""

    CLAIMING = "claiming"    # polled or found; not yet (known to be) ours
    CLAIMED = "claimed"      # ours; its job is being built
    WAITING = "waiting"      # ours, its job built, waiting for its scheduled time
    RUNNING = "running"      # its infrastructure exists and is watched
    STOPPING = "stopping"    # the worker is stopping its infrastructure
    ENDING = "ending"        # the infrastructure is gone; its final state is being written
    DONE = "done"            # this worker is done with it (its claim is forgotten)


@dataclass(frozen=True)
class Transition:
    """A run's change of phase, and what happened, in the worker log's words."""

    old: RunPhase
    new: RunPhase
    #: "claimed", "started", "reattached", "fenced", ...; None for a plain change of phase.
    event: str | None = None
    #: The facts observers pass on (the log line's fields).
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunReport:
    """What the worker settled about a run outside a `Run`'s phases (the state that ended it, a
    hand-back, a take-over, a journal entry let go), for the same observers."""

    flow_run_id: uuid.UUID
    #: The event counted in `flowhand_flow_runs_total{event}`; None: nothing counted.
    counted: str | None = None
    #: The line for the run's logs in the Prefect UI, (level, message); None: no line.
    line: tuple[int, str] | None = None
    #: True when this worker lets go of the run's claim (its journal entry goes).
    forget: bool = False


class RunObserver(Protocol):
    """Hears every change of phase of every run, and every report about one (see
    `worker/observers.py`)."""

    def on_phase(self, run: Run, change: Transition) -> None: ...

    def on_report(self, report: RunReport) -> None: ...


class RunReports:
    """Publishes `RunReport`s to the worker's observers (the roles that settle runs they hold
    no `Run` for: the reporter, take-over, reconciliation)."""

    def __init__(self, observers: list[RunObserver]) -> None:
        self.observers = observers

    def publish(self, report: RunReport) -> None:
        for observer in self.observers:
            observer.on_report(report)


@dataclass
class Run:
    """What the worker knows about one run it is handling."""

    flow_run: FlowRun
    log: FilteringBoundLogger
    phase: RunPhase = RunPhase.CLAIMING
    #: Why flowhand is stopping it, once anyone asked (see `outcomes.overrides`).
    stop_intent: StopIntent | None = None
    handle: Handle | None = None
    started_at: float | None = None
    max_run_seconds: float | None = None
    #: The transition id of this worker's accepted PENDING: what makes the claim ours.
    transition_id: uuid.UUID | None = None
    #: The infrastructure this worker started for the run (or found it had started).
    infrastructure_pid: str | None = None
    #: Monotonic time the claim was known to be ours.
    claimed_at: float | None = None
    #: Set when anyone asks the run to stop, to wake what waits on the run.
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    #: Bytes of its output that were dropped, and the last reason; said in its logs at the end.
    output_dropped: int = 0
    output_dropped_reason: str | None = None
    #: Told of each change of phase.
    observers: list[RunObserver] = field(default_factory=list)

    @property
    def id(self) -> uuid.UUID:
        return self.flow_run.id

    def request_stop(self, intent: StopIntent) -> bool:
        """Record why the run should stop; True when this changes the reason."""
        if not overrides(intent, self.stop_intent):
            return False
        self.stop_intent = intent
        self.stop_requested.set()
        return True

    def enter(self, phase: RunPhase, event: str | None = None, **fields: Any) -> None:
        """Move to `phase` and tell the observers (`event` says what happened)."""
        change = Transition(self.phase, phase, event, fields)
        self.phase = phase
        for observer in self.observers:
            observer.on_phase(self, change)

    def claimed(self, transition_id: uuid.UUID) -> None:
        """The claim is ours: PENDING with `transition_id`."""
        self.transition_id = transition_id
        self.claimed_at = time.monotonic()

    def mark_started(self, handle: Handle, elapsed_seconds: float = 0.0,
                     event: str | None = None, **fields: Any) -> None:
        """Its infrastructure runs (`event`: "started" by us now, or "reattached")."""
        self.handle = handle
        self.infrastructure_pid = handle.infrastructure_pid
        self.started_at = time.monotonic() - max(0.0, elapsed_seconds)
        self.enter(RunPhase.RUNNING, event, **fields)


class RunTable:
    """The runs in flight, the task group their handlers run in, and the drained signal."""

    def __init__(self, limit: int | None, metrics: Metrics, log: FilteringBoundLogger,
                 on_done: Callable[[uuid.UUID], None] | None = None,
                 observers: list[RunObserver] | None = None) -> None:
        self.limit = limit
        #: Told of every tracked run's changes of phase.
        self.observers = observers if observers is not None else []
        #: Called with a run's id when its handler ends (whatever happened).
        self.on_done = on_done
        self.metrics = metrics
        self.log = log
        self.runs: dict[uuid.UUID, Run] = {}
        #: Set when no run is in flight and the worker is stopping.
        self.drained = anyio.Event()
        self.stopping = False
        self._tg: anyio.abc.TaskGroup | None = None
        # An idle worker's gauges are right from the start, not 0 until a first run.
        self._update_gauges()

    def __len__(self) -> int:
        return len(self.runs)

    def __contains__(self, flow_run_id: object) -> bool:
        return flow_run_id in self.runs

    def get(self, flow_run_id: uuid.UUID) -> Run | None:
        return self.runs.get(flow_run_id)

    def values(self) -> list[Run]:
        return list(self.runs.values())

    def free_slots(self) -> int:
        if self.limit is None:
            return MAX_POLL_LIMIT
        return max(0, self.limit - len(self.runs))

    def attach(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run a background task in the worker's task group."""
        assert self._tg is not None, "runs are handled inside Worker.run"
        self._tg.start_soon(func, *args)

    def track(self, flow_run: FlowRun) -> Run:
        log = self.log.bind(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name)
        run = Run(flow_run=flow_run, log=log, observers=self.observers)
        self.runs[flow_run.id] = run
        self._update_gauges()
        return run

    def spawn(self, handler: Callable[[Run], Awaitable[None]], run: Run) -> None:
        """Handle `run` in the background; whatever happens, its slot is freed at the end."""
        self.start_soon(self._guarded, handler, run)

    def stop(self) -> None:
        self.stopping = True
        if not self.runs:
            self.drained.set()

    async def _guarded(self, handler: Callable[[Run], Awaitable[None]], run: Run) -> None:
        try:
            with run_logging(run.log):
                await handler(run)
        except Exception as exc:  # noqa: BLE001 - one run's surprise must not stop the worker
            # The journal keeps the claim, so the next reconcile pass picks the run up again.
            run.log.exception("flow_run.unexpected_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.runs.pop(run.id, None)
            if self.on_done is not None:
                self.on_done(run.id)
            self._update_gauges()
            if not self.runs and self.stopping:
                self.drained.set()

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(len(self.runs))
        self.metrics.free_slots.set(self.free_slots())


def pool_of(config: Config) -> str:
    """The worker's pool name (checked when the worker is built)."""
    assert config.pool is not None
    return config.pool


def worker_logger(pool: str, backend: str, worker: str) -> FilteringBoundLogger:
    log: FilteringBoundLogger = structlog.get_logger("flowhand.worker").bind(
        pool=pool, backend=backend, worker=worker)
    return log
