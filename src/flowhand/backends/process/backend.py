"""Run flow runs as local processes, a drop-in for Prefect's process work pools.

Each run gets its own session (so signals reach the whole process group and the run survives the
worker), writes its output to a pipe it holds itself, named under the state directory (so output
never touches the disk, never fails the run, and a restarted worker reads on: see
`output_pipe`), and is waited for through a pidfd: no thread per run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import anyio
import structlog
from pydantic import Field
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import (
    Backend,
    BackendContext,
    BackendSettings,
    Exit,
    Handle,
    Job,
    JobConfig,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.backends.output import OutputPump
from flowhand.backends.process import procfs
from flowhand.backends.process.attempt_control import AttemptSession, SignalStatus, deliver_intent
from flowhand.backends.process.engine_command import (
    EngineResolver,
    PrefectInstall,
    WorkspaceAttempt,
    prepare_workspace,
    wants_workspace,
)
from flowhand.backends.process.engine_hooks import hooks_for
from flowhand.backends.process.output_pipe import (
    RunOutput,
    clean_runs_dir,
    open_run_output,
    reopen_run_output,
)
from flowhand.backends.process.warm import identity
from flowhand.backends.process.warm.pool import WarmChild, WarmEngines, open_pidfd
from flowhand.backends.process.warm.settings import WarmSettings
from flowhand.errors import LaunchFailed
from flowhand.state_dir import make_private_dir

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.process")
#: Bounds of the pause between two looks at a run's output: short while it talks, long when
#: it has been quiet for a while.
OUTPUT_POLL_MIN_SECONDS = 0.1
OUTPUT_POLL_MAX_SECONDS = 10.0


class ProcessSettings(BackendSettings, WarmSettings):
    """The `[subprocess]` table."""

    #: Seconds between SIGTERM and SIGKILL when a run's process group is stopped.
    kill_grace_seconds: float = Field(30.0, ge=0)
    #: Last output lines quoted in a CRASHED state's message.
    crash_log_lines: int = Field(20, ge=0)
    #: The Python of the Prefect installation that runs flows (`-m prefect.engine`); default:
    #: the interpreter of the `prefect` on the run's PATH.
    python: str | None = None
    #: The pipe buffer each run writes its output into (the kernel's memory, never the disk):
    #: how much a run may print while no worker reads before its writes wait.
    output_buffer_bytes: int = Field(1 << 20, ge=4096, le=1 << 30)


class ProcessJobConfig(JobConfig):
    """The job variables of a Prefect process pool."""

    working_dir: Path | None = None


@dataclass
class ProcessHandle(Handle):
    pid: int = 0
    process: subprocess.Popen[bytes] | None = None
    output: RunOutput | None = field(default=None, repr=False)
    stream_output: bool = True
    temp_dir: str | None = None
    started_at_ticks: str | None = None
    pidfd: int | None = field(default=None, repr=False)
    sink: OutputSink | None = field(default=None, repr=False)
    #: The attempt-control session with the engine (none after a re-attach).
    session: AttemptSession | None = field(default=None, repr=False)
    #: For on_crashed hooks: the Prefect that runs the flow, its entry point, the run's
    #: environment and the engine's directory once it connected.
    install: PrefectInstall | None = field(default=None, repr=False)
    entrypoint: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    engine_cwd: str | None = None
    #: Prefect's workspace supervisor started the engine (dependency auto-install on).
    workspace: WorkspaceAttempt | None = None
    #: Forked by a warm helper, which reports its exit status.
    warm: WarmChild | None = field(default=None, repr=False)


def _remove(directories: tuple[str | None, ...]) -> None:
    for path in directories:
        if path:
            shutil.rmtree(path, ignore_errors=True)


class ProcessBackend(Backend):
    """Start each run's command as a child process in its own session."""

    pool_type: ClassVar[str] = "process"
    job_model = ProcessJobConfig
    template_resource = "process.json"
    #: Its table is `[subprocess]`, the backend's other name (`[process]` would read as a pool).
    settings_section = "subprocess"
    settings_model = ProcessSettings
    settings: ProcessSettings

    def __init__(self, settings: ProcessSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.hostname = socket.gethostname()
        self.state_dir = Path(context.state_dir)
        self.runs_dir = self.state_dir / "runs"
        self.engines = EngineResolver(settings.python)
        self.warm = WarmEngines(settings, context.state_dir) if settings.warm_start else None

    @property
    def kill_grace_seconds(self) -> float:
        return float(self.settings.kill_grace_seconds)

    async def prepare(self) -> None:
        removed = clean_runs_dir(self.runs_dir)
        if removed:
            log.info("process.output_cleaned", removed=len(removed), runs_dir=str(self.runs_dir))

    # -- starting ---------------------------------------------------------------------------

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        assert isinstance(job.config, ProcessJobConfig)
        env = self._environment(job)
        install = await self.engines.resolve(env) if job.command_is_default else None
        argv = install.engine_argv() if install is not None else self._argv(job)
        if not argv:
            raise LaunchFailed("the command is empty")
        if "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
            raise LaunchFailed(
                f"command not found: {argv[0]!r} (PATH={env.get('PATH', '')}). Install it in the "
                "worker's environment or set `command` in the deployment's job variables."
            )
        cwd, temp_dir = self._working_dir(job.config)
        workspace = None
        if install is not None and wants_workspace(env, install):
            workspace = prepare_workspace(install, str(job.flow_run_id), cwd)
            argv = workspace.argv
        leftovers = (temp_dir, workspace.directory if workspace else None)
        try:
            make_private_dir(self.runs_dir)
            output = open_run_output(self.runs_dir, job.flow_run_id,
                                     self.settings.output_buffer_bytes)
        except OSError as exc:
            _remove(leftovers)
            raise LaunchFailed(f"cannot make the run's output pipe: {exc.strerror or exc}") \
                from None
        session = AttemptSession()
        env.update(await session.open())
        assert output.writer is not None
        warm = None
        if self.warm is not None and install is not None and workspace is None:
            warm = await self.warm.start(install.python, env, cwd, output.writer,
                                         job.flow_run_id)
        try:
            process = None if warm else self._spawn(argv, cwd, env, output.writer)
        except OSError as exc:
            await session.aclose()
            output.remove()
            _remove(leftovers)
            raise LaunchFailed(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        output.close_writer()

        pid = warm.pid if warm else process.pid if process else 0
        handle = ProcessHandle(
            infrastructure_pid=f"{self.hostname}:{pid}",
            flow_run_id=job.flow_run_id,
            command=shlex.join(argv),
            pid=pid,
            process=process,
            output=output,
            stream_output=job.config.stream_output,
            sink=job.output_sink,
            temp_dir=temp_dir,
            started_at_ticks=procfs.start_ticks(pid),
            pidfd=open_pidfd(pid),
            session=session,
            install=install,
            entrypoint=job.deployment.entrypoint if job.deployment else None,
            env=env,
            workspace=workspace,
            warm=warm,
        )
        # Where the engine runs once connected: its pull steps are done and its flow loaded.
        session.on_connect = lambda: setattr(handle, "engine_cwd", procfs.cwd(handle.pid))
        if warm:
            identity.write(self.state_dir, job.flow_run_id, pid, handle.started_at_ticks)
        log.debug("process.started", flow_run_id=str(job.flow_run_id), pid=pid,
                  argv=argv[:3], warm=warm is not None)
        await record_pid(handle.infrastructure_pid)
        return handle

    def _argv(self, job: Job) -> list[str]:
        """The command as an argument vector; LaunchFailed when it cannot be one."""
        try:
            return shlex.split(job.command)
        except ValueError as exc:
            raise LaunchFailed(f"cannot parse command {job.command!r}: {exc}") from None

    def _environment(self, job: Job) -> dict[str, str]:
        """The worker's environment with the run's laid over it."""
        env = {**os.environ, **job.env}
        # An explicit null in the job's env removes an inherited variable, as in Prefect.
        for key, value in job.config.env.items():
            if value is None:
                env.pop(key, None)
        return env

    def _working_dir(self, config: ProcessJobConfig) -> tuple[str, str | None]:
        """(directory to run in, temporary directory to remove afterwards, if one was made)."""
        if config.working_dir is None:
            temp_dir = tempfile.mkdtemp(prefix="flowhand-")
            return temp_dir, temp_dir
        cwd = str(config.working_dir)
        if not os.path.isdir(cwd):
            raise LaunchFailed(f"working directory does not exist: {cwd!r}")
        return cwd, None

    def _spawn(
        self, argv: list[str], cwd: str, env: dict[str, str], output: int
    ) -> subprocess.Popen[bytes]:
        """The child, in a session of its own, writing stdout and stderr to `output`."""
        # Popen forks with vfork and returns at once; a thread per start would cost more.
        return subprocess.Popen(  # noqa: ASYNC220
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # -- waiting ----------------------------------------------------------------------------

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, ProcessHandle)
        pump = None
        if handle.output is not None:
            run_id = handle.flow_run_id
            pump = OutputPump(
                handle.output.source,
                stream_output=handle.stream_output,
                sink=handle.sink,
                tail_lines=self.settings.crash_log_lines,
                min_seconds=OUTPUT_POLL_MIN_SECONDS,
                max_seconds=OUTPUT_POLL_MAX_SECONDS,
                on_dropped=lambda size, why: self.output_dropped(run_id, size, why),
            )
        try:
            async with anyio.create_task_group() as tg:
                if handle.session is not None:
                    tg.start_soon(handle.session.serve)
                if pump is None:
                    await self._wait_exit(handle)
                else:
                    async with pump.following():
                        await self._wait_exit(handle)
                if handle.session is not None and handle.session.connected:
                    # A receipt sent just before exiting is read before the session closes.
                    with anyio.move_on_after(1.0):
                        await handle.session.wait_ended()
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled (the worker detaches on shutdown): the process lives on, and so must its
            # output pipe and working directory, for the next worker to re-attach.
            self._close_pidfd(handle)
            if handle.output is not None:
                handle.output.close()
            raise
        code = await handle.warm.exit_code() if handle.warm else self._exit_code(handle)
        tail = await pump.finish() if pump is not None else []
        session = handle.session
        hooks = None
        if session is not None:  # a process this worker started (not re-attached)
            hooks = hooks_for(
                flow_run_id=str(handle.flow_run_id), status_code=code,
                concluded=session.conclusion is not None,
                relinquished=session.conclusion is StopIntent.RELINQUISH, install=handle.install,
                entrypoint=handle.entrypoint, engine_cwd=handle.engine_cwd, env=handle.env,
                workspace=handle.workspace, temp_dir=handle.temp_dir)
            if hooks is not None and handle.temp_dir in hooks.owned_dirs:
                handle.temp_dir = None  # the hooks load the flow from there: kept for them
            await session.aclose()
        self._cleanup(handle)
        return Exit(status_code=code, output_tail=tail,
                    engine_outcome=session.outcome if session else None, hooks=hooks)

    async def _wait_exit(self, handle: ProcessHandle) -> None:
        if handle.pidfd is None:
            return
        # A pidfd becomes readable when the process exits; the event loop watches it for us.
        await anyio.wait_readable(handle.pidfd)

    def _exit_code(self, handle: ProcessHandle) -> int | None:
        if handle.process is not None:
            return handle.process.wait()
        # Re-attached after a restart: not our child, so its status cannot be read.
        return None

    def _close_pidfd(self, handle: ProcessHandle) -> None:
        if handle.pidfd is not None:
            os.close(handle.pidfd)
            handle.pidfd = None

    def _cleanup(self, handle: ProcessHandle) -> None:
        self._close_pidfd(handle)
        identity.remove(self.state_dir, handle.flow_run_id)
        if handle.output is not None:
            handle.output.remove()
        if handle.temp_dir:
            shutil.rmtree(handle.temp_dir, ignore_errors=True)

    # -- stopping and finding ---------------------------------------------------------------

    def _alive(self, handle: ProcessHandle) -> bool:
        if handle.process is not None:
            return handle.process.poll() is None
        return procfs.start_ticks(handle.pid) == handle.started_at_ticks

    def _signal(self, handle: ProcessHandle, signum: signal.Signals) -> None:
        """Signal the run's whole process group; gone or not ours any more is not an error."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signum)

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, ProcessHandle)
        if not self._alive(handle):
            return
        if intent is not None:
            bound = log.bind(flow_run_id=str(handle.flow_run_id), pid=handle.pid)
            status = await deliver_intent(handle.session, intent, bound)
            if status is SignalStatus.ALREADY_CONCLUDED:
                # The engine reported its final state and is exiting: let it, within the grace.
                with anyio.move_on_after(grace_seconds):
                    while self._alive(handle):  # noqa: ASYNC110 - not ours to await
                        await anyio.sleep(0.1)
                    return
        self._signal(handle, signal.SIGTERM)
        with anyio.move_on_after(grace_seconds):
            while self._alive(handle):  # noqa: ASYNC110 - the process is not ours to await
                await anyio.sleep(min(0.2, grace_seconds / 10 or 0.1))
            return
        self._signal(handle, signal.SIGKILL)

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        host, _, pid_text = infrastructure_pid.rpartition(":")
        if host != self.hostname or not pid_text.isdigit():
            return None
        pid = int(pid_text)
        # A PID can be reused: only a process carrying this run's id in its environment is ours.
        if not (procfs.runs_flow_run(pid, flow_run_id)
                or identity.matches(self.state_dir, flow_run_id, pid)):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        return ProcessHandle(
            infrastructure_pid=infrastructure_pid,
            flow_run_id=flow_run_id,
            pid=pid,
            output=reopen_run_output(self.runs_dir, flow_run_id, pid),
            stream_output=False,
            temp_dir=procfs.run_temp_dir(pid),  # else left behind when the run ends
            started_at_ticks=procfs.start_ticks(pid),
            pidfd=pidfd,
        )
