"""The default command of a process run: Prefect's engine, started as Prefect's worker starts it.

Prefect's process worker runs `<python> -m prefect.engine` with the interpreter of the Prefect
installation the run uses; the engine reads the run, runs the deployment's pull steps (Prefect's
own `run_steps`, in the run's working directory), loads the flow and runs it. flowhand does the
same, without loading Prefect's CLI (`prefect flow-run execute` costs more than twice the CPU).

Which Prefect: `[subprocess] python` when set, else the `prefect` found on the run's PATH (the
job's `env.PATH`, else the worker's), whose interpreter is read from its first line as the
installer wrote it. The interpreter is asked once where its Prefect package is (without
importing Prefect); a missing Prefect fails the start, so the run ends CRASHED with the reason.

With Prefect's dependency auto-install on (PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES), whether the
engine runs under `uv run` is known only after the pull steps; the run then starts through
Prefect's own workspace supervisor, exactly as Prefect's worker starts it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from flowhand.errors import LaunchFailed

#: Asks an interpreter where Prefect is and which version, without importing Prefect.
_PROBE = (
    "import importlib.util as u, importlib.metadata as m\n"
    "s = u.find_spec('prefect')\n"
    "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')\n"
    "print(m.version('prefect') if s else '')\n"
)


@dataclass(frozen=True)
class PrefectInstall:
    """A Prefect installation: its interpreter, package directory and version."""

    python: str
    package_dir: Path
    version: str

    def engine_argv(self) -> list[str]:
        return [self.python, "-m", "prefect.engine"]

    @property
    def hook_bootstrap(self) -> Path | None:
        """Prefect's runner entry point that runs a flow's hooks in a fresh process (3.8+)."""
        path = self.package_dir / "runner" / "_workspace_runtime_bootstrap.py"
        return path if path.is_file() else None


def interpreter_of_script(script: Path, path_env: str | None) -> str | None:
    """The Python interpreter a console script (such as `prefect`) runs with."""
    try:
        with script.open("rb") as fh:
            head = fh.read(1024).decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    if head and head[0].startswith("#!"):
        words = head[0][2:].split()
        if words and words[0].endswith("/env") and len(words) > 1:
            return shutil.which(words[1], path=path_env)
        if words and "python" in Path(words[0]).name:
            return words[0]
        # pip's form for long paths: "#!/bin/sh" then "'''exec' /path/python "$0" "$@"".
        for line in head[1:3]:
            if line.startswith("'''exec'"):
                parts = line.split()
                if len(parts) > 1:
                    return parts[1]
    sibling = script.parent / "python"
    return str(sibling) if sibling.exists() else None


class EngineResolver:
    """Finds the Prefect installation for a run; remembers what each interpreter answered."""

    def __init__(self, configured_python: str | None = None) -> None:
        self.configured_python = configured_python
        self._installs: dict[str, PrefectInstall] = {}

    def python_for(self, env: dict[str, str]) -> str:
        """The interpreter to run the engine with, or LaunchFailed saying how to provide one."""
        if self.configured_python:
            return self.configured_python
        path_env = env.get("PATH", os.environ.get("PATH", ""))
        script = shutil.which("prefect", path=path_env)
        if script is None:
            raise LaunchFailed(
                "no Prefect found to run the flow: `prefect` is not on the run's PATH "
                f"({path_env}). Install prefect where the worker runs, put its bin directory "
                "on PATH (or in the job's env.PATH), set `python` in the [subprocess] section "
                "of flowhand's config, or set `command` in the deployment's job variables."
            )
        python = interpreter_of_script(Path(script), path_env)
        if python is None:
            raise LaunchFailed(f"cannot tell which Python runs {script}; set `python` in the "
                               "[subprocess] section of flowhand's config")
        return python

    async def resolve(self, env: dict[str, str]) -> PrefectInstall:
        python = self.python_for(env)
        known = self._installs.get(python)
        if known is not None and known.package_dir.is_dir():
            return known
        install = await self._probe(python, env)
        self._installs[python] = install
        return install

    async def _probe(self, python: str, env: dict[str, str]) -> PrefectInstall:
        probe_env = {k: v for k, v in env.items() if k in ("PATH", "PYTHONPATH", "HOME")}
        try:
            result = await anyio.run_process([python, "-c", _PROBE], env=probe_env,
                                             check=False, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise LaunchFailed(f"cannot run the Python that should run the engine, {python!r}: "
                               f"{exc.strerror or exc}") from None
        lines = result.stdout.decode(errors="replace").splitlines()
        if result.returncode != 0 or len(lines) < 2 or not lines[0]:
            raise LaunchFailed(
                f"Prefect is not installed for {python} (it cannot import prefect). Install "
                "prefect there, set `python` in the [subprocess] section of flowhand's config, "
                "or set `command` in the deployment's job variables."
            )
        return PrefectInstall(python=python, package_dir=Path(lines[0]), version=lines[1])


#: Prefect's setting that has its workspace supervisor run the engine under `uv run` when the
#: pulled project asks for Prefect in its pyproject.toml.
AUTO_INSTALL_ENV = "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES"
_TRUE = {"1", "true", "t", "yes", "y", "on"}


def wants_workspace(env: dict[str, str], install: PrefectInstall) -> bool:
    """Dependency auto-install is on and this Prefect has the supervisor that does it (3.8+)."""
    supervisor = install.package_dir / "runner" / "_workspace_supervisor.py"
    return env.get(AUTO_INSTALL_ENV, "").strip().lower() in _TRUE and supervisor.is_file()


@dataclass(frozen=True)
class WorkspaceAttempt:
    """Prefect's workspace supervisor for one attempt: its private directory and command.

    The supervisor runs the pull steps, writes a manifest (where the flow is, which command
    runs its hooks), then replaces itself (same PID) with the engine, under `uv run` when
    Prefect's rules say so.
    """

    directory: str
    argv: list[str]

    @property
    def manifest_path(self) -> Path:
        return Path(self.directory) / "workspace.json"

    def manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("working_directory") else None


def prepare_workspace(install: PrefectInstall, flow_run_id: str,
                      workspace_root: str) -> WorkspaceAttempt:
    directory = tempfile.mkdtemp(prefix="flowhand-workspace-")  # private: mode 0700
    config = Path(directory) / "supervisor.json"
    config.write_text(json.dumps({
        "flow_run_id": flow_run_id,
        "workspace_root": workspace_root,
        "manifest_path": str(Path(directory) / "workspace.json"),
        "command": None,
    }))
    argv = [install.python, "-m", "prefect.runner._workspace_supervisor", str(config)]
    return WorkspaceAttempt(directory=directory, argv=argv)
