"""A flow's hooks that Prefect's process worker runs outside the engine, run the same way.

An engine killed from outside (SIGKILL, the OOM killer) cannot run its own on_crashed hooks.
Prefect's worker then reports the run CRASHED and runs them in a fresh process of the same
Prefect installation, through Prefect's runner entry point
(`prefect/runner/_workspace_runtime_bootstrap.py hook crashed MANIFEST FLOW_RUN STATE`), which
loads the flow from its entry point in the directory the engine ran in and calls the hooks.
flowhand runs the same entry point with the same inputs:

* engine command (`-m prefect.engine`): flowhand writes the manifest; the engine's directory
  (after its pull steps) is read when it connects to the attempt-control session;
* Prefect's workspace supervisor (auto-install): the supervisor wrote the manifest itself, and
  since it leaves cancellation to its supervisor, on_cancellation hooks run this way too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from flowhand.backends.process.attempt_control import PORT_ENV, TOKEN_ENV
from flowhand.backends.process.engine_command import PrefectInstall, WorkspaceAttempt

log = structlog.get_logger("flowhand.backends.process.engine_hooks")
#: A hook that hangs must not hold the run's slot forever.
HOOK_TIMEOUT_SECONDS = 300.0


def engine_manifest(python: str, bootstrap: Path, working_directory: str, entrypoint: str,
                    env: dict[str, str]) -> dict[str, Any]:
    """The manifest Prefect's workspace supervisor would have written for this engine."""
    return {
        "working_directory": working_directory,
        "project_root": None,
        "runtime_entrypoint": entrypoint,
        "hook_command": [python, str(bootstrap), "hook"],
        "environment": {k: v for k, v in env.items() if k not in (PORT_ENV, TOKEN_ENV)},
    }


@dataclass
class PrefectHooks:
    """One attempt's out-of-process hooks (the backend's `EngineHooks`).

    `run("crashed", ...)` does something only when Prefect's worker would run on_crashed (the
    engine exited non-zero without concluding); `run("cancellation", ...)` only when the engine
    left cancellation to us. `release()` then removes what was kept for the hooks.
    """

    #: Prefect's manifest: working_directory, runtime_entrypoint, hook_command, environment.
    #: The environment holds the API key, so it is kept out of reprs.
    manifest: dict[str, Any] = field(repr=False)
    flow_run_id: str
    crashed_allowed: bool
    runs_cancellation: bool = False
    owned_dirs: list[str] = field(default_factory=list)
    _released: bool = False

    async def run(self, kind: str, flow_run: dict[str, Any]) -> None:
        allowed = self.crashed_allowed if kind == "crashed" else self.runs_cancellation
        command = self.manifest.get("hook_command")
        bound = log.bind(flow_run_id=self.flow_run_id, hook=f"on_{kind}")
        if not allowed:
            return
        if not command:
            bound.warning("flow_run.hooks_not_run", reason=(
                "the flow-run command exposes no Python runtime for hooks" if self.manifest
                else "Prefect's workspace supervisor stopped before it prepared the flow"))
            return
        state = flow_run.get("state") or {}
        cwd = str(self.manifest["working_directory"])
        env = {str(k): str(v) for k, v in self.manifest.get("environment", {}).items()}
        with tempfile.TemporaryDirectory(prefix="flowhand-hooks-") as tmp:
            paths = [Path(tmp) / f"{name}.json" for name in ("manifest", "flow_run", "state")]
            for path, body in zip(paths, (self.manifest, flow_run, state), strict=True):
                path.write_text(json.dumps(body))
            result = None
            with anyio.move_on_after(HOOK_TIMEOUT_SECONDS):
                try:
                    result = await anyio.run_process(
                        [*command, kind, *map(str, paths)], cwd=cwd, env=env, check=False,
                        stderr=subprocess.STDOUT)
                except OSError as exc:
                    bound.warning("flow_run.hooks_failed", error=str(exc))
                    return
        if result is None:
            bound.warning("flow_run.hooks_failed",
                          error=f"still running after {HOOK_TIMEOUT_SECONDS:g} s; stopped")
        elif result.returncode != 0:
            tail = result.stdout.decode(errors="replace").splitlines()[-5:]
            bound.warning("flow_run.hooks_failed", status_code=result.returncode,
                          output_tail=tail)
        else:
            bound.info("flow_run.hooks_ran", path="prefect hook runner", working_directory=cwd)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        for path in self.owned_dirs:
            shutil.rmtree(path, ignore_errors=True)


def hooks_for(
    *, flow_run_id: str, status_code: int | None, concluded: bool,
    install: PrefectInstall | None, entrypoint: str | None, engine_cwd: str | None,
    env: dict[str, str], workspace: WorkspaceAttempt | None, temp_dir: str | None,
    relinquished: bool = False,
) -> PrefectHooks | None:
    """The hooks flowhand may have to run for an attempt that ended, as Prefect's worker would.

    Prefect's worker runs on_crashed only for an engine that exited non-zero without concluding
    (no receipt, no acknowledged intent). An engine that acknowledged `relinquish` left the
    run's next state to the worker, so on_crashed is the worker's to run too. Under its
    workspace supervisor the manifest says how; otherwise flowhand builds it from the engine's
    directory. `temp_dir` is handed over (kept until `release()`) when the hooks will run in it.
    """
    crashed_allowed = relinquished or (status_code not in (0, None) and not concluded)
    if workspace is not None:
        manifest = workspace.manifest()
        hooks = PrefectHooks(manifest or {}, flow_run_id, crashed_allowed,
                             runs_cancellation=manifest is not None,
                             owned_dirs=[workspace.directory])
    elif (crashed_allowed and install is not None and install.hook_bootstrap is not None
          and engine_cwd is not None and entrypoint is not None):
        hooks = PrefectHooks(
            engine_manifest(install.python, install.hook_bootstrap, engine_cwd, entrypoint, env),
            flow_run_id, crashed_allowed=True)
    else:
        return None
    cwd = hooks.manifest.get("working_directory")
    if temp_dir and cwd and Path(str(cwd)).is_relative_to(temp_dir):
        hooks.owned_dirs.append(temp_dir)
    return hooks
