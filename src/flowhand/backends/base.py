"""The infrastructure backend interface: start, wait, kill, reattach.

A backend turns a resolved `Job` into running infrastructure and reports how it ended. The core
never imports a backend's libraries; it finds backends by name through the `flowhand.backends`
entry point group, so third-party packages can add their own.
"""

from __future__ import annotations

import abc
import enum
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from flowhand.api.models import Deployment, FlowRun, WorkPool

#: Receives lines the infrastructure printed, for the run's logs in the Prefect UI; returns False
#: once it wants no more (its budget is spent), so lines are no longer split for it.
OutputSink = Callable[[list[str]], bool | None]

#: Told (flow run id, bytes, why) when a run's output had to be dropped; see `Backend`.
OutputDropped = Callable[[uuid.UUID, int, str], None]

#: A backend's metrics handle: counts one of its own events, (event, reason), e.g.
#: ("warm_start_fallback", "memory"); the worker exports them as `flowhand_backend_events`.
CountEvent = Callable[[str, str], None]

#: Called by `Backend.start` with the infrastructure id as soon as it exists, before the run can
#: make progress, so that a run is never running without being findable.
RecordPid = Callable[[str], Awaitable[None]]


class BackendSettings(BaseModel):
    """Base of a backend's settings table (`[docker]`, `[process]`): unknown keys are errors.

    The core reads the table from the TOML file, `FLOWHAND_<SECTION>__<KEY>` variables and
    overrides, validates it with the backend's `settings_model` and reports problems as it does
    for its own keys.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)


#: Told (flow run id, logging level, message) for a line about the run in its logs (the
#: Kubernetes backend says once why a pod waits).
RunNote = Callable[[uuid.UUID, int, str], None]

#: Told (event name, resource, related resources, event id) for an event about a run's
#: infrastructure.
InfrastructureEvent = Callable[[str, dict[str, str], list[dict[str, str]], str], None]


class BackendReports:
    """The one channel from a backend to the worker, beside `wait`'s answer.

    Counts of the backend's own events (warm starts, their fallbacks, ...) by (event, reason):
    a backend calls `count`, the worker's metrics read `counts()`. Output read but dropped, lines
    for a run's logs and events about a run's infrastructure: the worker subscribes when it is
    built (`on_output_dropped`, `on_run_note`, `on_infrastructure_event`), a backend reports
    through the matching method; with no subscriber, a report goes nowhere.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._output_dropped: list[OutputDropped] = []
        self._run_notes: list[RunNote] = []
        self._infrastructure_events: list[InfrastructureEvent] = []

    def count(self, event: str, reason: str = "") -> None:
        self._counts[(event, reason)] = self._counts.get((event, reason), 0) + 1

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(self._counts)

    def on_output_dropped(self, callback: OutputDropped) -> None:
        """Call `callback(flow_run_id, bytes, why)` for output read but not passed on."""
        self._output_dropped.append(callback)

    def output_dropped(self, flow_run_id: uuid.UUID, size: int, reason: str) -> None:
        for callback in self._output_dropped:
            callback(flow_run_id, size, reason)

    def on_run_note(self, callback: RunNote) -> None:
        """Call `callback(flow_run_id, level, message)` for a line in the run's logs."""
        self._run_notes.append(callback)

    def run_note(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        for callback in self._run_notes:
            callback(flow_run_id, level, message)

    def on_infrastructure_event(self, callback: InfrastructureEvent) -> None:
        """Call `callback(name, resource, related, event_id)` for a Prefect event about a run's
        infrastructure (the Kubernetes backend's `prefect.kubernetes.pod.*`)."""
        self._infrastructure_events.append(callback)

    def infrastructure_event(self, name: str, resource: dict[str, str],
                             related: list[dict[str, str]], event_id: str) -> None:
        for callback in self._infrastructure_events:
            callback(name, resource, related, event_id)


@dataclass(frozen=True)
class BackendContext:
    """The core facts a backend may use, beyond its own settings."""

    #: flowhand's state directory (`state_dir`); a backend keeps its files below it.
    state_dir: Path
    #: This worker's name (`name`).
    worker_name: str
    #: Where the backend reports to the worker: its event counts (`reports.count`) for the
    #: metrics, output it dropped, lines for a run's logs, infrastructure events.
    reports: BackendReports = field(default_factory=BackendReports, compare=False)


class EngineHooks(Protocol):
    """Flow hooks the worker runs out of process, as Prefect's worker does, for one attempt.

    `run("crashed", run)` after the worker reported the run CRASHED, `run("cancellation", run)`
    before it reports CANCELLED (when `runs_cancellation`: the engine left that to the worker),
    each with the run as the API returns it; `release()` always, last.
    """

    runs_cancellation: bool

    async def run(self, kind: str, flow_run: dict[str, Any]) -> None: ...

    async def release(self) -> None: ...


class StopIntent(enum.Enum):
    """Why the worker stops a run (its stop request), told to the engine before the signal when
    it can listen.

    Prefect's engine then knows what SIGTERM means: CANCEL runs on_cancellation hooks and ends
    the run CANCELLED; RESCHEDULE and RELINQUISH leave the next state to the worker.
    """

    #: The run is being cancelled on the server.
    CANCEL = "cancel"
    #: The worker shuts down with `[shutdown] mode = reschedule`: the run goes back to the pool.
    RESCHEDULE = "reschedule"
    #: The run ran past its maximum run time: the engine exits without a state and the worker
    #: reports it CRASHED with the limit (and runs its on_crashed hooks).
    RELINQUISH = "relinquish"


@dataclass(frozen=True)
class EngineOutcome:
    """How the engine said it concluded its attempt (Prefect's outcome receipt).

    `state_type` is None when orchestration aborted the attempt (someone else owns the run).
    """

    state_type: str | None
    state_name: str | None = None

    @property
    def aborted(self) -> bool:
        return self.state_type is None


class JobConfig(BaseModel):
    """Fields every pool type's job configuration has; backends extend it."""

    model_config = ConfigDict(extra="ignore")

    command: str | None = None
    env: dict[str, str | None] = {}
    labels: dict[str, str] = {}
    name: str | None = None
    stream_output: bool = True


@dataclass(frozen=True)
class Job:
    """Everything a backend needs to start one flow run."""

    flow_run: FlowRun
    flow_name: str
    deployment: Deployment | None
    pool: WorkPool
    worker_name: str
    config: JobConfig
    #: The run's environment in Prefect's order (PREFECT_* settings, flow run id, attribution,
    #: then the job's env). The process backend lays it over the worker's own environment.
    env: dict[str, str]
    labels: dict[str, str]
    #: The command to run; the job's `command` or `prefect flow-run execute`.
    command: str
    #: True when `command` is the default (no `command` in the job): a backend may start
    #: Prefect's engine its own way (the process backend runs `python -m prefect.engine`).
    command_is_default: bool = False
    #: Stop and crash the run after this long (job variable `max_run_seconds`, else config).
    max_run_seconds: float | None = None
    #: Where to send the infrastructure's output as it comes (`[run_logs] forward_output`).
    output_sink: OutputSink | None = None

    @property
    def flow_run_id(self) -> uuid.UUID:
        return self.flow_run.id


@dataclass
class Exit:
    """How infrastructure ended."""

    #: The exit status; negative for a signal (as Python reports it); None when unknowable
    #: (the infrastructure vanished while nobody was watching).
    status_code: int | None
    #: A backend-specific explanation that beats the generic one (e.g. OOM with the limit).
    explanation: str | None = None
    #: The last lines the infrastructure printed, for the crash message.
    output_tail: list[str] = field(default_factory=list)
    #: The backend stopped watching infrastructure that is still running (Docker's
    #: container_wait_timeout); the run reports its own state, so the worker reports nothing.
    detached: bool = False
    #: What the engine reported over the attempt-control session, when it did: the run's state
    #: is then known without reading it back.
    engine_outcome: EngineOutcome | None = None
    #: The flow's hooks that the worker runs itself (on_crashed after a killed engine, ...).
    hooks: EngineHooks | None = None


@dataclass
class Handle:
    """A started piece of infrastructure. Backends may subclass it to keep their own state."""

    infrastructure_pid: str
    flow_run_id: uuid.UUID
    #: The command that actually runs, when the backend chose it (the job's `command` of
    #: "prefect flow-run execute" runs as `<python> -m prefect.engine`): for the logs.
    command: str | None = field(default=None, kw_only=True)


class Backend(abc.ABC):
    """A way to run flow runs. One instance serves the whole worker.

    The core builds it as `cls(settings, context)`: `settings` is an instance of
    `settings_model` validated from the configuration's `[settings_section]` table (defaults when
    the table is absent), `context` the core facts it may need.
    """

    #: The Prefect work pool type this backend serves ("process", "docker", ...).
    pool_type: ClassVar[str]
    #: The configuration table of this backend's settings (`[docker]`, and the environment
    #: variables `FLOWHAND_DOCKER__<KEY>`): its registered name or an alias of it. None: no
    #: settings.
    settings_section: ClassVar[str | None] = None
    #: The model that table is validated into.
    settings_model: ClassVar[type[BaseModel]] = BackendSettings
    #: The model the resolved job configuration is validated into.
    job_model: ClassVar[type[JobConfig]] = JobConfig
    #: The packaged base job template for pools this worker creates, or override the classmethod.
    template_resource: ClassVar[str | None] = None

    def __init__(self, settings: BaseModel, context: BackendContext) -> None:
        if not isinstance(settings, self.settings_model):
            raise TypeError(f"{type(self).__name__} takes {self.settings_model.__name__} settings, "
                            f"not {type(settings).__name__}")
        self.settings = settings
        self.context = context

    @classmethod
    def default_base_job_template(cls) -> dict[str, Any]:
        """The base job template used when flowhand creates or fills the pool."""
        if cls.template_resource is None:
            raise NotImplementedError(f"{cls.__name__} has no base job template")
        text = resources.files("flowhand").joinpath("templates", cls.template_resource).read_text()
        template: dict[str, Any] = json.loads(text)
        return template

    @property
    def kill_grace_seconds(self) -> float:
        """Seconds between the polite stop and the forced one when the worker stops a run."""
        return 30.0

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Raise BackendUnavailable when the backend cannot start runs right now."""

    async def prepare(self) -> None:  # noqa: B027 - optional hook
        """Called once when the worker starts serving, its state directory checked and locked,
        before any run is re-attached or started: tidy what earlier worker processes left."""

    def output_dropped(self, flow_run_id: uuid.UUID, size: int, reason: str) -> None:
        """Report `size` bytes of a run's output dropped, for `reason`: output that was read but
        could not be passed on. The worker counts it (`flowhand_output_dropped_bytes`) and says
        so in the run's logs (it subscribes through `context.reports`)."""
        if size > 0:
            self.context.reports.output_dropped(flow_run_id, size, reason)

    def run_note(self, flow_run_id: uuid.UUID, level: int, message: str) -> None:
        """Say something about a run in its logs (not its output), while it runs."""
        self.context.reports.run_note(flow_run_id, level, message)

    def emit_event(self, name: str, resource: dict[str, str], related: list[dict[str, str]],
                   event_id: str) -> None:
        """Send a Prefect event about a run's infrastructure, with the worker's events."""
        self.context.reports.infrastructure_event(name, resource, related, event_id)

    def prepare_env(self, job_env: dict[str, str]) -> dict[str, str]:
        """Adjust the run environment for this backend (the Docker backend rewrites the API URL)."""
        return job_env

    @abc.abstractmethod
    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        """Start the infrastructure; call `record_pid` as soon as its id exists.

        Raise LaunchFailed with a reason a user can act on when it cannot be started.
        """

    @abc.abstractmethod
    async def wait(self, handle: Handle) -> Exit:
        """Wait until the infrastructure exits and say how. Must not hold a thread per run."""

    @abc.abstractmethod
    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        """Stop it: a polite signal, `grace_seconds`, then force. Gone already is not an error.

        With an `intent`, a backend that can tell the engine why (before the signal) does so.
        """

    @abc.abstractmethod
    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        """Find infrastructure started earlier (perhaps by a previous worker process).

        Return None when it is not ours or no longer exists; verify identity, not just the id.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (clients, watchers)."""
