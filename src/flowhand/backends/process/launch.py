"""What a process run is started as: its command, environment and working directory, decided
before anything is started (`plan_launch`), and the cold start itself (`spawn`)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flowhand.backends.base import Job
from flowhand.backends.process.engine_command import (
    EngineResolver,
    PrefectInstall,
    WorkspaceAttempt,
    prepare_workspace,
    wants_workspace,
)
from flowhand.errors import LaunchFailed


@dataclass
class LaunchPlan:
    """How one run starts; `install` is set when the command is Prefect's engine."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    #: A temporary working directory made for the run (removed at its end).
    temp_dir: str | None
    install: PrefectInstall | None
    #: Prefect's workspace supervisor starts the engine (dependency auto-install on).
    workspace: WorkspaceAttempt | None = None

    def remove_directories(self) -> None:
        """The run could not start: remove what was made for it."""
        for path in (self.temp_dir, self.workspace.directory if self.workspace else None):
            if path:
                shutil.rmtree(path, ignore_errors=True)


async def plan_launch(job: Job, working_dir: Path | None, engines: EngineResolver) -> LaunchPlan:
    """The plan for `job`; LaunchFailed with the reason when it cannot start."""
    env = run_environment(job)
    install = await engines.resolve(env) if job.command_is_default else None
    argv = install.engine_argv() if install is not None else command_argv(job)
    if not argv:
        raise LaunchFailed("the command is empty")
    if "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
        raise LaunchFailed(
            f"command not found: {argv[0]!r} (PATH={env.get('PATH', '')}). Install it in the "
            "worker's environment or set `command` in the deployment's job variables."
        )
    cwd, temp_dir = _working_dir(working_dir)
    plan = LaunchPlan(argv, env, cwd, temp_dir, install)
    if install is not None and wants_workspace(env, install):
        plan.workspace = prepare_workspace(install, str(job.flow_run_id), cwd)
        plan.argv = plan.workspace.argv
    return plan


def command_argv(job: Job) -> list[str]:
    """The command as an argument vector; LaunchFailed when it cannot be one."""
    try:
        return shlex.split(job.command)
    except ValueError as exc:
        raise LaunchFailed(f"cannot parse command {job.command!r}: {exc}") from None


def run_environment(job: Job) -> dict[str, str]:
    """The worker's environment with the run's laid over it."""
    env = {**os.environ, **job.env}
    # An explicit null in the job's env removes an inherited variable, as in Prefect.
    for key, value in job.config.env.items():
        if value is None:
            env.pop(key, None)
    return env


def _working_dir(configured: Path | None) -> tuple[str, str | None]:
    """(directory to run in, temporary directory to remove afterwards, if one was made)."""
    if configured is None:
        temp_dir = tempfile.mkdtemp(prefix="flowhand-")
        return temp_dir, temp_dir
    cwd = str(configured)
    if not os.path.isdir(cwd):
        raise LaunchFailed(f"working directory does not exist: {cwd!r}")
    return cwd, None


def spawn(plan: LaunchPlan, output: int) -> subprocess.Popen[bytes]:
    """The child, in a session of its own, writing stdout and stderr to `output`."""
    # Popen forks with vfork and returns at once; a thread per start would cost more.
    return subprocess.Popen(  # noqa: ASYNC220
        plan.argv,
        cwd=plan.cwd,
        env=plan.env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
