"""A process run's handle, by concern: the process, its output, and the attempt that started it.

`RunProcess` is the process itself (cold: our child; warm: forked by a helper; re-attached:
neither) and how its end is learned; `RunIO` where its output goes; `AttemptInputs` what only
the worker that started the run holds (the attempt-control session and what on_crashed hooks
need). A re-attached run has a process and its output, never an attempt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field

from flowhand.backends.base import Handle, OutputSink
from flowhand.backends.process.attempt_control import AttemptSession
from flowhand.backends.process.engine_command import PrefectInstall, WorkspaceAttempt
from flowhand.backends.process.output_pipe import RunOutput
from flowhand.backends.process.procfs import cwd, start_ticks
from flowhand.backends.process.warm.pool import WarmChild


@dataclass
class RunProcess:
    """The run's process: its PID, its start time (its identity), and a pidfd to await."""

    pid: int
    started_at_ticks: str | None
    pidfd: int | None = field(default=None, repr=False)
    #: A cold start: our child, whose status we read.
    child: subprocess.Popen[bytes] | None = None
    #: Forked by a warm helper, which reports its exit status.
    warm: WarmChild | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.poll() is None
        return start_ticks(self.pid) == self.started_at_ticks

    def signal_group(self, signum: signal.Signals) -> None:
        """Signal the run's whole process group; gone or not ours any more is not an error."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def exit_code(self) -> int | None:
        if self.warm is not None:
            return await self.warm.exit_code()
        if self.child is not None:
            return self.child.wait()
        # Re-attached after a restart: not our child, so its status cannot be read.
        return None

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@dataclass
class RunIO:
    """Where the run's output goes: its pipe, the worker's log, the run's logs in Prefect."""

    output: RunOutput | None = field(default=None, repr=False)
    stream_output: bool = True
    sink: OutputSink | None = field(default=None, repr=False)


@dataclass
class AttemptInputs:
    """The attempt this worker started: for on_crashed hooks, the Prefect that runs the flow, its
    entry point, the run's environment and the engine's directory once it connected."""

    install: PrefectInstall | None
    entrypoint: str | None
    env: dict[str, str] = field(repr=False)
    #: Prefect's workspace supervisor started the engine (dependency auto-install on).
    workspace: WorkspaceAttempt | None = None
    #: The engine's process, known once it started.
    pid: int = 0
    engine_cwd: str | None = None
    session: AttemptSession = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.session = AttemptSession(on_connect=self.engine_connected)

    def engine_connected(self) -> None:
        """Where the engine runs once connected: its pull steps are done and its flow loaded."""
        self.engine_cwd = cwd(self.pid)


@dataclass
class ProcessHandle(Handle):
    process: RunProcess = field(default_factory=lambda: RunProcess(0, None))
    io: RunIO = field(default_factory=RunIO)
    #: A temporary working directory flowhand made, removed at the end.
    temp_dir: str | None = None
    #: None after a re-attach.
    attempt: AttemptInputs | None = None
