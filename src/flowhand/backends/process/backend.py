"""Run flow runs as local processes, a drop-in for Prefect's process work pools.

Each run gets its own session (so signals reach the whole process group and the run survives the
worker), writes its output to a pipe it holds itself, named under the state directory (so output
never touches the disk, never fails the run, and a restarted worker reads on: see
`output_pipe`), and is waited for through a pidfd: no thread per run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import uuid
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
    EngineHooks,
    Exit,
    Handle,
    Job,
    JobConfig,
    RecordPid,
    StopIntent,
)
from flowhand.backends.output import OutputPump
from flowhand.backends.process.attempt_control import SignalStatus, deliver_intent
from flowhand.backends.process.engine_command import EngineResolver
from flowhand.backends.process.engine_hooks import hooks_for
from flowhand.backends.process.handle import AttemptInputs, ProcessHandle, RunIO, RunProcess
from flowhand.backends.process.launch import LaunchPlan, plan_launch, spawn
from flowhand.backends.process.output_pipe import (
    RunOutput,
    clean_runs_dir,
    open_run_output,
    reopen_run_output,
)
from flowhand.backends.process.procfs import run_temp_dir, runs_flow_run, start_ticks
from flowhand.backends.process.warm import identity
from flowhand.backends.process.warm.pool import WarmEngines, open_pidfd
from flowhand.backends.process.warm.settings import WarmSettings
from flowhand.errors import LaunchFailed
from flowhand.state_dir import make_private_dir

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.process")
#: Bounds of the pause between two looks at a run's output: short while it talks, long when
#: it has been quiet for a while.
OUTPUT_POLL_MIN_SECONDS = 0.1
OUTPUT_POLL_MAX_SECONDS = 10.0


class ProcessSettings(BackendSettings, WarmSettings):
    """The `[process]` table (also read as `[subprocess]`, its former name)."""

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


class ProcessBackend(Backend):
    """Start each run's command as a child process in its own session."""

    pool_type: ClassVar[str] = "process"
    job_model = ProcessJobConfig
    template_resource = "process.json"
    #: The `[process]` table; `[subprocess]`, its former name, is still read (see
    #: flowhand.backends.canonical_section).
    settings_section = "process"
    settings_model = ProcessSettings
    settings: ProcessSettings

    def __init__(self, settings: ProcessSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.hostname = socket.gethostname()
        self.state_dir = Path(context.state_dir)
        self.runs_dir = self.state_dir / "runs"
        self.engines = EngineResolver(settings.python)
        self.warm = (WarmEngines(settings, context.state_dir, context.reports.count)
                     if settings.warm_start else None)

    @property
    def kill_grace_seconds(self) -> float:
        return float(self.settings.kill_grace_seconds)

    async def prepare(self) -> None:
        # At debug: `flowhand config` shows the choice; start-up errors stay one line.
        log.debug("process.warm_start", effective=self.settings.warm_start_effective)
        removed = clean_runs_dir(self.runs_dir)
        if removed:
            log.info("process.output_cleaned", removed=len(removed), runs_dir=str(self.runs_dir))

    # -- starting ---------------------------------------------------------------------------

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        assert isinstance(job.config, ProcessJobConfig)
        plan = await plan_launch(job, job.config.working_dir, self.engines)
        output = self._open_output(job.flow_run_id, plan)
        attempt = AttemptInputs(plan.install,
                                job.deployment.entrypoint if job.deployment else None,
                                plan.env, plan.workspace)
        plan.env.update(await attempt.session.open())
        try:
            process = await self._launch(job, plan, output)
        except LaunchFailed:
            await attempt.session.aclose()
            raise
        output.close_writer()
        attempt.pid = process.pid
        handle = ProcessHandle(
            infrastructure_pid=f"{self.hostname}:{process.pid}", flow_run_id=job.flow_run_id,
            command=shlex.join(plan.argv),
            process=process, io=RunIO(output, job.config.stream_output, job.output_sink),
            temp_dir=plan.temp_dir, attempt=attempt)
        if process.warm is not None:
            identity.write(self.state_dir, job.flow_run_id, process.pid,
                           process.started_at_ticks)
        log.debug("process.started", flow_run_id=str(job.flow_run_id), pid=process.pid,
                  argv=plan.argv[:3], warm=process.warm is not None)
        await record_pid(handle.infrastructure_pid)
        return handle

    def _open_output(self, flow_run_id: uuid.UUID, plan: LaunchPlan) -> RunOutput:
        """The run's output pipe; LaunchFailed (its directories removed) when it cannot be."""
        try:
            make_private_dir(self.runs_dir)
            return open_run_output(self.runs_dir, flow_run_id, self.settings.output_buffer_bytes)
        except OSError as exc:
            plan.remove_directories()
            raise LaunchFailed(f"cannot make the run's output pipe: {exc.strerror or exc}") \
                from None

    async def _launch(self, job: Job, plan: LaunchPlan, output: RunOutput) -> RunProcess:
        """The run's process: forked by a warm helper when one can, else spawned cold."""
        assert output.writer is not None
        warm = None
        if self.warm is not None and plan.install is not None and plan.workspace is None:
            warm = await self.warm.start(plan.install.python, plan.env, plan.cwd, output.writer,
                                         job.flow_run_id)
        child = None
        if warm is None:
            try:
                child = spawn(plan, output.writer)
            except OSError as exc:
                output.remove()
                plan.remove_directories()
                raise LaunchFailed(f"cannot start {plan.argv[0]!r}: {exc.strerror or exc}") \
                    from None
        pid = warm.pid if warm is not None else child.pid if child is not None else 0
        return RunProcess(pid, start_ticks(pid), open_pidfd(pid), child=child, warm=warm)

    # -- waiting ----------------------------------------------------------------------------

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, ProcessHandle)
        pump = self._pump(handle)
        try:
            await self._watch(handle, pump)
        except BaseException:
            # Cancelled (the worker detaches on shutdown): the process lives on, and so must its
            # output pipe and working directory, for the next worker to re-attach.
            handle.process.close_pidfd()
            if handle.io.output is not None:
                handle.io.output.close()
            raise
        code = await handle.process.exit_code()
        tail = await pump.finish() if pump is not None else []
        hooks = await self._end_attempt(handle, code)
        self._cleanup(handle)
        outcome = handle.attempt.session.outcome if handle.attempt is not None else None
        return Exit(status_code=code, output_tail=tail, engine_outcome=outcome, hooks=hooks)

    def _pump(self, handle: ProcessHandle) -> OutputPump | None:
        """What reads the run's output, when this worker can read it."""
        if handle.io.output is None:
            return None
        run_id = handle.flow_run_id
        return OutputPump(
            handle.io.output.source,
            stream_output=handle.io.stream_output,
            sink=handle.io.sink,
            tail_lines=self.settings.crash_log_lines,
            min_seconds=OUTPUT_POLL_MIN_SECONDS,
            max_seconds=OUTPUT_POLL_MAX_SECONDS,
            on_dropped=lambda size, why: self.output_dropped(run_id, size, why),
        )

    async def _watch(self, handle: ProcessHandle, pump: OutputPump | None) -> None:
        """Until the process exited: its output followed, its attempt session served."""
        session = handle.attempt.session if handle.attempt is not None else None
        async with anyio.create_task_group() as tg:
            if session is not None:
                tg.start_soon(session.serve)
            if pump is None:
                await self._wait_exit(handle)
            else:
                async with pump.following():
                    await self._wait_exit(handle)
            if session is not None and session.connected:
                # A receipt sent just before exiting is read before the session closes.
                with anyio.move_on_after(1.0):
                    await session.wait_ended()
            tg.cancel_scope.cancel()

    async def _wait_exit(self, handle: ProcessHandle) -> None:
        if handle.process.pidfd is None:
            return
        # A pidfd becomes readable when the process exits; the event loop watches it for us.
        await anyio.wait_readable(handle.process.pidfd)

    async def _end_attempt(self, handle: ProcessHandle, code: int | None) -> EngineHooks | None:
        """Close the attempt this worker started (none after a re-attach); the flow's hooks
        the worker has to run, if any."""
        attempt = handle.attempt
        if attempt is None:
            return None
        session = attempt.session
        hooks = hooks_for(
            flow_run_id=str(handle.flow_run_id), status_code=code,
            concluded=session.conclusion is not None,
            relinquished=session.conclusion is StopIntent.RELINQUISH, install=attempt.install,
            entrypoint=attempt.entrypoint, engine_cwd=attempt.engine_cwd, env=attempt.env,
            workspace=attempt.workspace, temp_dir=handle.temp_dir)
        if hooks is not None and handle.temp_dir in hooks.owned_dirs:
            handle.temp_dir = None  # the hooks load the flow from there: kept for them
        await session.aclose()
        return hooks

    def _cleanup(self, handle: ProcessHandle) -> None:
        handle.process.close_pidfd()
        identity.remove(self.state_dir, handle.flow_run_id)
        if handle.io.output is not None:
            handle.io.output.remove()
        if handle.temp_dir:
            shutil.rmtree(handle.temp_dir, ignore_errors=True)

    # -- stopping and finding ---------------------------------------------------------------

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, ProcessHandle)
        process = handle.process
        if not process.alive():
            return
        if intent is not None and await self._told_and_ending(handle, intent, grace_seconds):
            return
        process.signal_group(signal.SIGTERM)
        with anyio.move_on_after(grace_seconds):
            while process.alive():  # noqa: ASYNC110 - the process is not ours to await
                await anyio.sleep(min(0.2, grace_seconds / 10 or 0.1))
            return
        process.signal_group(signal.SIGKILL)

    async def _told_and_ending(
        self, handle: ProcessHandle, intent: StopIntent, grace_seconds: float
    ) -> bool:
        """Tell the engine why it is stopped; True when it had concluded already and exited
        within the grace (no signal needed)."""
        bound = log.bind(flow_run_id=str(handle.flow_run_id), pid=handle.process.pid)
        session = handle.attempt.session if handle.attempt is not None else None
        status = await deliver_intent(session, intent, bound)
        if status is not SignalStatus.ALREADY_CONCLUDED:
            return False
        # The engine reported its final state and is exiting: let it, within the grace.
        with anyio.move_on_after(grace_seconds):
            while handle.process.alive():  # noqa: ASYNC110 - not ours to await
                await anyio.sleep(0.1)
            return True
        return False

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        host, _, pid_text = infrastructure_pid.rpartition(":")
        if host != self.hostname or not pid_text.isdigit():
            return None
        pid = int(pid_text)
        # A PID can be reused: only a process carrying this run's id in its environment is ours.
        if not (runs_flow_run(pid, flow_run_id)
                or identity.matches(self.state_dir, flow_run_id, pid)):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        return ProcessHandle(
            infrastructure_pid=infrastructure_pid,
            flow_run_id=flow_run_id,
            process=RunProcess(pid, start_ticks(pid), pidfd),
            io=RunIO(reopen_run_output(self.runs_dir, flow_run_id, pid), stream_output=False),
            temp_dir=run_temp_dir(pid),  # else left behind when the run ends
        )
