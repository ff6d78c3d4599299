"""Run flow runs as local processes, a drop-in for Prefect's process work pools.

Each run gets its own session (so signals reach the whole process group and the run survives the
worker), writes its output to a file under the state directory (so nothing is lost when the
worker restarts and the crash message can quote the last lines), and is waited for through a
pidfd: no thread per run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog

from flowhand.backends.attempt_control import AttemptSession, SignalStatus, deliver_intent
from flowhand.backends.base import (
    Backend,
    Exit,
    Handle,
    Job,
    JobConfig,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.backends.engine_command import (
    EngineResolver,
    PrefectInstall,
    WorkspaceAttempt,
    prepare_workspace,
    wants_workspace,
)
from flowhand.backends.engine_hooks import hooks_for
from flowhand.errors import LaunchFailed

log = structlog.get_logger("flowhand.backends.subprocess")
#: Bounds of the pause between two looks at a run's output file: short while it talks, long when
#: it has been quiet for a while.
OUTPUT_POLL_MIN_SECONDS = 0.1
OUTPUT_POLL_MAX_SECONDS = 10.0


class ProcessJobConfig(JobConfig):
    """The job variables of a Prefect process pool."""

    working_dir: Path | None = None


@dataclass
class ProcessHandle(Handle):
    pid: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    stream_output: bool = True
    temp_dir: str | None = None
    started_at_ticks: str | None = None
    pidfd: int | None = field(default=None, repr=False)
    sink: OutputSink | None = field(default=None, repr=False)
    #: Bytes of the output file already copied to our stdout and the sink.
    copied: int = 0
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


def _proc_start_ticks(pid: int) -> str | None:
    """Start time in clock ticks since boot: with the pid, an identity a reused PID lacks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _proc_has_flow_run(pid: int, flow_run_id: uuid.UUID) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.split(b"\0")


def _remember_engine_cwd(handle: ProcessHandle) -> None:
    """Where the engine runs once connected: its pull steps are done and its flow loaded."""
    with contextlib.suppress(OSError):
        handle.engine_cwd = os.readlink(f"/proc/{handle.pid}/cwd")


def tail_lines(path: Path, count: int, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `count` lines of a file, reading at most `max_bytes` from its end."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line for line in lines if line.strip()][-count:]


class SubprocessBackend(Backend):
    """Start each run's command as a child process in its own session."""

    pool_type: ClassVar[str] = "process"
    job_model = ProcessJobConfig
    template_resource = "process.json"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.hostname = socket.gethostname()
        self.runs_dir = Path(config.state_dir) / "runs"
        self.engines = EngineResolver(config.subprocess.python)

    @property
    def kill_grace_seconds(self) -> float:
        return float(self.config.subprocess.kill_grace_seconds)

    def _log_path(self, flow_run_id: uuid.UUID) -> Path:
        return self.runs_dir / f"{flow_run_id}.log"

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        assert isinstance(job.config, ProcessJobConfig)
        env = {**os.environ, **job.env}
        # An explicit null in the job's env removes an inherited variable, as in Prefect.
        for key, value in job.config.env.items():
            if value is None:
                env.pop(key, None)
        install = None
        if job.command_is_default:
            install = await self.engines.resolve(env)
            argv = install.engine_argv()
        else:
            try:
                argv = shlex.split(job.command)
            except ValueError as exc:
                raise LaunchFailed(f"cannot parse command {job.command!r}: {exc}") from None
        if not argv:
            raise LaunchFailed("the command is empty")
        if "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
            raise LaunchFailed(
                f"command not found: {argv[0]!r} (PATH={env.get('PATH', '')}). Install it in the "
                "worker's environment or set `command` in the deployment's job variables."
            )

        temp_dir = None
        if job.config.working_dir is not None:
            cwd = str(job.config.working_dir)
            if not os.path.isdir(cwd):  # noqa: ASYNC240 - one stat, no I/O wait
                raise LaunchFailed(f"working directory does not exist: {cwd!r}")
        else:
            temp_dir = cwd = tempfile.mkdtemp(prefix="flowhand-")

        workspace = None
        if install is not None and wants_workspace(env, install):
            workspace = prepare_workspace(install, str(job.flow_run_id), cwd)
            argv = workspace.argv
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_path(job.flow_run_id)
        session = AttemptSession()
        env.update(await session.open())
        try:
            with log_path.open("ab") as out:
                # Popen forks with vfork and returns at once; a thread per start would cost more.
                process = subprocess.Popen(  # noqa: ASYNC220
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            await session.aclose()
            for path in (temp_dir, workspace.directory if workspace else None):
                if path:
                    shutil.rmtree(path, ignore_errors=True)
            raise LaunchFailed(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None

        handle = ProcessHandle(
            infrastructure_pid=f"{self.hostname}:{process.pid}",
            flow_run_id=job.flow_run_id,
            pid=process.pid,
            process=process,
            log_path=log_path,
            stream_output=job.config.stream_output,
            sink=job.output_sink,
            temp_dir=temp_dir,
            started_at_ticks=_proc_start_ticks(process.pid),
            pidfd=os.pidfd_open(process.pid),
            session=session,
            install=install,
            entrypoint=job.deployment.entrypoint if job.deployment else None,
            env=env,
            workspace=workspace,
        )
        session.on_connect = lambda: _remember_engine_cwd(handle)
        log.debug("process.started", flow_run_id=str(job.flow_run_id), pid=process.pid,
                  argv=argv[:3])
        await record_pid(handle.infrastructure_pid)
        return handle

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, ProcessHandle)
        copying = handle.log_path is not None and (handle.stream_output or handle.sink is not None)
        try:
            async with anyio.create_task_group() as tg:
                if copying:
                    tg.start_soon(self._copy_output, handle)
                if handle.session is not None:
                    tg.start_soon(handle.session.serve)
                await self._wait_exit(handle)
                if handle.session is not None and handle.session.connected:
                    # A receipt sent just before exiting is read before the session closes.
                    with anyio.move_on_after(1.0):
                        await handle.session.wait_ended()
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled (the worker detaches on shutdown): the process lives on, and so must its
            # output file and working directory, for the next worker to re-attach.
            self._close_pidfd(handle)
            raise
        if copying:
            self._copy_new(handle, final=True)
        code = self._exit_code(handle)
        tail = tail_lines(handle.log_path, self.config.subprocess.crash_log_lines) \
            if handle.log_path else []
        session = handle.session
        hooks = None
        if session is not None:  # a process this worker started (not re-attached)
            hooks = hooks_for(
                flow_run_id=str(handle.flow_run_id), status_code=code,
                concluded=session.conclusion is not None, install=handle.install,
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

    async def _copy_output(self, handle: ProcessHandle) -> None:
        """Copy new output to our stdout and the sink, polling faster while the run talks.

        A quiet run costs one stat every few seconds: a wake-up a second per run would cost
        more than 1 % of a core with a thousand runs in flight.
        """
        assert handle.log_path is not None
        delay = OUTPUT_POLL_MIN_SECONDS
        while True:
            try:
                grown = handle.log_path.stat().st_size > handle.copied
            except OSError:
                grown = False
            copied = self._copy_new(handle) if grown else 0
            delay = OUTPUT_POLL_MIN_SECONDS if copied else min(delay * 2, OUTPUT_POLL_MAX_SECONDS)
            await anyio.sleep(delay)

    def _copy_new(self, handle: ProcessHandle, final: bool = False) -> int:
        """Copy whole new lines (all that is left when `final`); return the bytes copied."""
        assert handle.log_path is not None
        try:
            with handle.log_path.open("rb") as fh:
                fh.seek(handle.copied)
                data = fh.read()
        except OSError:
            return 0
        # Only whole lines until the end, so two runs' output never interleaves mid-line.
        cut = len(data) if final else data.rfind(b"\n") + 1
        if cut <= 0:
            return 0
        chunk = data[:cut]
        handle.copied += cut
        if handle.stream_output:
            sys.stdout.buffer.write(chunk if chunk.endswith(b"\n") else chunk + b"\n")
            sys.stdout.flush()
        if handle.sink is not None:
            handle.sink(chunk.decode("utf-8", errors="replace").splitlines())
        return cut

    def _close_pidfd(self, handle: ProcessHandle) -> None:
        if handle.pidfd is not None:
            os.close(handle.pidfd)
            handle.pidfd = None

    def _cleanup(self, handle: ProcessHandle) -> None:
        self._close_pidfd(handle)
        if handle.log_path:
            with contextlib.suppress(OSError):
                handle.log_path.unlink()
        if handle.temp_dir:
            shutil.rmtree(handle.temp_dir, ignore_errors=True)

    def _alive(self, handle: ProcessHandle) -> bool:
        if handle.process is not None:
            return handle.process.poll() is None
        return _proc_start_ticks(handle.pid) == handle.started_at_ticks

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
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signal.SIGTERM)
        with anyio.move_on_after(grace_seconds):
            while self._alive(handle):  # noqa: ASYNC110 - the process is not ours to await
                await anyio.sleep(min(0.2, grace_seconds / 10 or 0.1))
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signal.SIGKILL)

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        host, _, pid_text = infrastructure_pid.rpartition(":")
        if host != self.hostname or not pid_text.isdigit():
            return None
        pid = int(pid_text)
        # A PID can be reused: only a process carrying this run's id in its environment is ours.
        if not _proc_has_flow_run(pid, flow_run_id):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        log_path = self._log_path(flow_run_id)
        return ProcessHandle(
            infrastructure_pid=infrastructure_pid,
            flow_run_id=flow_run_id,
            pid=pid,
            log_path=log_path if log_path.exists() else None,
            stream_output=False,
            started_at_ticks=_proc_start_ticks(pid),
            pidfd=pidfd,
        )
