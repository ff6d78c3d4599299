"""A flow's on_crashed hooks, run after its engine died, as Prefect's process worker runs them.

An engine killed from outside (SIGKILL, the OOM killer) cannot run its own on_crashed hooks.
Prefect's worker then reports the run CRASHED and runs the hooks in a fresh process of the same
Prefect installation, through Prefect's runner entry point
(`prefect/runner/_workspace_runtime_bootstrap.py hook crashed MANIFEST FLOW_RUN STATE`), which
loads the flow from its entry point in the directory the engine ran in and calls the hooks.
flowhand runs the same entry point with the same inputs; the engine's directory (after the pull
steps) is read when the engine connects to the attempt-control session.
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

from flowhand.backends.attempt_control import PORT_ENV, TOKEN_ENV

log = structlog.get_logger("flowhand.backends.engine_hooks")
#: A hook that hangs must not hold the run's slot forever.
HOOK_TIMEOUT_SECONDS = 300.0


@dataclass
class CrashHookRunner:
    """Everything needed to run one attempt's on_crashed hooks after the engine is gone.

    Called once: with the run when it was reported CRASHED, else with None. Either way it then
    removes `owned_dir`, the run's temporary directory kept for the hooks when the engine ran
    in it (a deployment without pull steps).
    """

    python: str
    bootstrap: Path
    working_directory: str
    entrypoint: str
    #: The run's environment: it holds the API key, so it is kept out of reprs.
    env: dict[str, str] = field(repr=False)
    flow_run_id: str = ""
    owned_dir: str | None = None
    called: bool = False

    async def __call__(self, flow_run: dict[str, Any] | None) -> None:
        if self.called:
            return
        self.called = True
        try:
            state = (flow_run or {}).get("state") or {}
            if state.get("type") == "CRASHED":
                await self._run(flow_run or {}, state)
        finally:
            if self.owned_dir:
                shutil.rmtree(self.owned_dir, ignore_errors=True)

    async def _run(self, flow_run: dict[str, Any], state: dict[str, Any]) -> None:
        env = {k: v for k, v in self.env.items() if k not in (PORT_ENV, TOKEN_ENV)}
        manifest = {
            "working_directory": self.working_directory,
            "project_root": None,
            "runtime_entrypoint": self.entrypoint,
            "hook_command": [self.python, str(self.bootstrap), "hook"],
            "environment": env,
        }
        bound = log.bind(flow_run_id=self.flow_run_id)
        with tempfile.TemporaryDirectory(prefix="flowhand-hooks-") as tmp:
            paths = {name: Path(tmp) / f"{name}.json" for name in ("manifest", "flow_run",
                                                                    "state")}
            for name, body in (("manifest", manifest), ("flow_run", flow_run),
                               ("state", state)):
                paths[name].write_text(json.dumps(body))
            argv = [self.python, str(self.bootstrap), "hook", "crashed",
                    str(paths["manifest"]), str(paths["flow_run"]), str(paths["state"])]
            result = None
            with anyio.move_on_after(HOOK_TIMEOUT_SECONDS):
                try:
                    result = await anyio.run_process(
                        argv, cwd=self.working_directory, env=env, check=False,
                        stderr=subprocess.STDOUT)
                except OSError as exc:
                    bound.warning("flow_run.crash_hooks_failed", error=str(exc))
                    return
        if result is None:
            bound.warning("flow_run.crash_hooks_failed",
                          error=f"still running after {HOOK_TIMEOUT_SECONDS:g} s; stopped")
        elif result.returncode != 0:
            tail = result.stdout.decode(errors="replace").splitlines()[-5:]
            bound.warning("flow_run.crash_hooks_failed", status_code=result.returncode,
                          output_tail=tail)
        else:
            bound.info("flow_run.crash_hooks_ran", path="prefect hook runner",
                       working_directory=self.working_directory)
