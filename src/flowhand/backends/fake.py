"""A backend that runs nothing, for fast tests of the worker: httpx.MockTransport for runs.

    backend = FakeBackend(handler=lambda job: Script(status_code=3, output=["boom"]))
    worker = Worker(config, client, backend)
    ...
    assert backend.started[0].flow_run_id == run_id
    assert [call.kind for call in backend.calls] == ["start", "wait"]

What each run does is a `Script`, from `handler(job)` (a function, like MockTransport's), or the
same `Script` for every run when `handler` is one, or "exit 0 at once" by default:

- `start_error="reason"`: `start` raises LaunchFailed("reason") (recorded as a start call
  whose detail is that error; the job is not in `started`).
- `status_code` (0), `explanation`: the `Exit` that `wait` returns when the run ends by itself.
- `runs_for` seconds (0) before it ends by itself; None: it runs until killed.
- `output`: lines given to the job's output sink once the run started; the last
  `tail_lines` non-blank ones are the `Exit`'s output_tail.
- `ignores_term`: a kill's polite signal does nothing, so it ends at the forced one, after
  the grace period (status -9); otherwise a kill ends it at once (status -15).

Calls are recorded in order in `calls` (`Call(kind, flow_run_id, detail)`, kind one of start,
wait, kill, reattach), with shortcuts `started` (the jobs), `killed` ((flow run id, grace)
pairs) and `reattached` ((infrastructure pid, flow run id) pairs). `check()` raises
BackendUnavailable(`unavailable`) while that attribute is set.

Build it directly (`FakeBackend(handler=..., tail_lines=20)`) or as the core does
(`create_backend(FakeBackend, config)`: every run exits 0). It serves `process` pools (subclass
it and set `pool_type` for another) and stops runs with a 0.5 s grace period.

Infrastructure ids are `fake:<n>`. `reattach` finds runs this instance started and those given
to `adopt(pid, flow_run_id, script)` (infrastructure "started by an earlier worker process") that
have not ended; any other id, a known id with another flow run id, or an ended run is None.
Everything stays in memory; no thread, process or timer outlives the test's event loop.
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
from pydantic import BaseModel

from flowhand.backends.base import (
    Backend,
    BackendContext,
    Exit,
    Handle,
    Job,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.backends.output import last_nonblank
from flowhand.errors import BackendUnavailable, LaunchFailed


@dataclass
class Script:
    """What one fake run does; see the module's docstring."""

    status_code: int | None = 0
    explanation: str | None = None
    runs_for: float | None = 0.0
    output: list[str] = field(default_factory=list)
    ignores_term: bool = False
    start_error: str | None = None


@dataclass(frozen=True)
class Call:
    """One call the backend received."""

    kind: str
    flow_run_id: uuid.UUID
    #: start: the infrastructure pid; kill: the grace seconds; reattach: the pid asked for.
    detail: Any = None


@dataclass
class FakeHandle(Handle):
    script: Script = field(default_factory=Script)
    sink: OutputSink | None = field(default=None, repr=False)
    #: The status it ended with, once it ended.
    ended_with: int | None = None
    ended: bool = False
    #: Ended by `kill`, not by itself.
    killed: bool = False
    _changed: anyio.Event | None = field(default=None, repr=False)

    def changed(self) -> anyio.Event:
        # Made on first use, inside the event loop (adopt() may run outside one).
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def end(self, status: int | None, killed: bool = False) -> None:
        if not self.ended:
            self.ended, self.ended_with, self.killed = True, status, killed
            self.changed().set()


Handler = Callable[[Job], Script]


class FakeBackend(Backend):
    """Scripted runs in memory, every call recorded; see the module's docstring."""

    pool_type: ClassVar[str] = "process"
    template_resource = "process.json"

    def __init__(
        self,
        settings: BaseModel | None = None,
        context: BackendContext | None = None,
        *,
        handler: Handler | Script | None = None,
        tail_lines: int = 20,
    ) -> None:
        super().__init__(
            settings if settings is not None else self.settings_model(),
            context or BackendContext(Path(tempfile.gettempdir()), "fake-worker"),
        )
        if handler is None or isinstance(handler, Script):
            script = handler or Script()
            self.handler: Handler = lambda job: script
        else:
            self.handler = handler
        self.tail_lines = tail_lines
        self.calls: list[Call] = []
        self.started: list[Job] = []
        self.killed: list[tuple[uuid.UUID, float]] = []
        #: What the engine was told with each kill (None: nothing, a plain signal).
        self.stop_intents: dict[uuid.UUID, StopIntent | None] = {}
        self.reattached: list[tuple[str, uuid.UUID]] = []
        #: Set to a reason to make `check()` raise BackendUnavailable.
        self.unavailable: str | None = None
        self.handles: dict[str, FakeHandle] = {}
        self._ids = itertools.count(1)

    @property
    def kill_grace_seconds(self) -> float:
        return 0.5

    async def check(self) -> None:
        if self.unavailable is not None:
            raise BackendUnavailable(self.unavailable)

    def adopt(self, infrastructure_pid: str, flow_run_id: uuid.UUID, script: Script) -> None:
        """Make `reattach` find infrastructure an earlier worker process started."""
        self.handles[infrastructure_pid] = FakeHandle(infrastructure_pid, flow_run_id, script)

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        script = self.handler(job)
        if script.start_error is not None:
            error = LaunchFailed(script.start_error)
            self.calls.append(Call("start", job.flow_run_id, error))
            raise error
        pid = f"fake:{next(self._ids)}"
        handle = FakeHandle(pid, job.flow_run_id, script, sink=job.output_sink)
        self.handles[pid] = handle
        self.calls.append(Call("start", job.flow_run_id, pid))
        self.started.append(job)
        await record_pid(pid)
        if handle.sink is not None and script.output:
            handle.sink(list(script.output))
        return handle

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, FakeHandle)
        self.calls.append(Call("wait", handle.flow_run_id))
        script = handle.script
        with anyio.move_on_after(script.runs_for if script.runs_for is not None else float("inf")):
            await handle.changed().wait()
        handle.end(script.status_code)
        return Exit(
            status_code=handle.ended_with,
            explanation=None if handle.killed else script.explanation,
            output_tail=last_nonblank(script.output, self.tail_lines),
        )

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, FakeHandle)
        self.calls.append(Call("kill", handle.flow_run_id, grace_seconds))
        self.killed.append((handle.flow_run_id, grace_seconds))
        self.stop_intents[handle.flow_run_id] = intent
        if handle.ended:
            return
        if not handle.script.ignores_term:
            handle.end(-15, killed=True)
            return
        with anyio.move_on_after(grace_seconds):
            await handle.changed().wait()
            return
        handle.end(-9, killed=True)

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        self.calls.append(Call("reattach", flow_run_id, infrastructure_pid))
        self.reattached.append((infrastructure_pid, flow_run_id))
        handle = self.handles.get(infrastructure_pid)
        if handle is None or handle.flow_run_id != flow_run_id or handle.ended:
            return None
        return handle
