"""Test helpers: a Prefect server of one version, the flows of tests/flows/fidelity.py deployed
on a process pool, and one `flowhand start` (the real CLI) serving it, cold or warm.

Used by tests/test_real_flows.py (the compatibility suite, run cold and warm) and
tests/test_warm_start.py (the faults of warm starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.prefect_env import API, PREFECT_ENVS, REPO, PrefectServer, skip_or_fail

FLOWS = REPO / "tests" / "flows"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
#: Deployment name -> (flow function, deploy() extras).
DEPLOYMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fidelity-completes": ("completes", {}),
    "fidelity-fails": ("fails", {}),
    "fidelity-flaky": ("flaky", {}),
    "fidelity-times-out": ("times_out", {}),
    "fidelity-killed": ("killed", {}),
    "fidelity-sleeper": ("sleeper", {}),
    "fidelity-child": ("child", {}),
    "fidelity-parent": ("parent", {}),
    "fidelity-suspends": ("suspends", {}),
    "fidelity-pauses": ("pauses", {}),
    "fidelity-serial": ("serial", {"concurrency_limit": 1}),
}
#: Job variables that have Prefect's workspace supervisor start the engine, as Prefect's worker
#: does with dependency auto-install on (no pyproject.toml here, so no `uv run`). Such runs
#: always start cold: the supervisor is a process of its own.
WORKSPACE = {"env": {"PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "true"}}
WORKER_CONFIG = """\
poll_interval_seconds = 0.5
watch_interval_seconds = 0.5
prefetch_seconds = 0
limit = 16
[logging]
format = "json"
[shutdown]
mode = "reschedule"
"""
#: A run case -> its deployment, or (deployment, job variables).
Runs = dict[str, str | tuple[str, dict[str, Any]]]


@dataclass
class Fleet:
    version: str
    warm: bool
    home: Path
    server: PrefectServer
    api: API
    pool: str
    marks: Path
    worker: subprocess.Popen[bytes]
    worker_log: Path
    deployments: dict[str, str]
    runs: dict[str, str] = field(default_factory=dict)
    #: Cases started by Prefect's workspace supervisor: cold even on a warm fleet.
    workspace_cases: set[str] = field(default_factory=set)

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        """The worker's log events of that name (and fields), over every flowhand it ran."""
        found = []
        lines = [line for log in sorted(self.home.glob("worker*.log"))
                 for line in log.read_text(errors="replace").splitlines()]
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name and all(event.get(k) == v for k, v in match.items()):
                found.append(event)
        return found

    def hooks(self, case: str) -> dict[str, list[str]]:
        """Which hooks ran for a case's run: hook name -> the state types they saw. A mark
        still empty is a hook still writing it: not counted yet."""
        run_id = self.runs[case]
        marks = {p.suffix[1:]: p.read_text().split() for p in self.marks.glob(f"{run_id}.*")
                 if p.suffix != ".attempt"}
        return {hook: seen for hook, seen in marks.items() if seen}

    def forked(self, case: str) -> bool:
        """Every start of the case's run so far was forked by a warm helper (and one was)."""
        run_id = self.runs[case]
        return bool(self.events("warm_start.forked", flow_run_id=run_id)) and not \
            self.events("warm_start.fallback", flow_run_id=run_id)

    def check_started_as_configured(self, case: str) -> None:
        """A warm fleet forked the case's run (unless the workspace supervisor started it); a
        cold fleet never did."""
        if self.warm and case not in self.workspace_cases:
            assert self.forked(case), f"{case} was not forked warm:\n{self.tail()}"
        else:
            assert not self.events("warm_start.forked", flow_run_id=self.runs[case]), case

    def wait_state(self, case: str, types: set[str], seconds: float = 240,
                   check_start: bool = True) -> dict[str, Any]:
        """The case's run state once its type is one of `types`; a final state is also checked
        to come from a run started the fleet's way (cold or warm) unless `check_start` is off
        (a fault test that expects a cold fallback checks that itself)."""
        run_id = self.runs[case]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.worker.poll() is None, f"flowhand exited: {self.tail()}"
            state = self.api.state(run_id)
            if state["type"] in types:
                if check_start and state["type"] in FINAL:
                    self.check_started_as_configured(case)
                return state
            time.sleep(0.3)
        raise AssertionError(f"{case} ({run_id}) not in {types} after {seconds} s: "
                             f"{self.api.state(run_id)}\n{self.tail()}")

    def wait_for(self, what: str, check: Callable[[], bool], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])

    def create_runs(self, runs: Runs) -> None:
        for case, target in runs.items():
            deployment, job_variables = target if isinstance(target, tuple) else (target, {})
            self.runs[case] = self.api.create_run(self.deployments[deployment],
                                                  job_variables=job_variables)
            if job_variables == WORKSPACE:
                self.workspace_cases.add(case)

    def restart_worker(self, log_name: str) -> None:
        """A new flowhand of the same name on the same state directory (after a kill)."""
        self.worker, self.worker_log = start_worker(self.home, self.pool, self.server,
                                                    self.marks, self.warm, log_name)


def deploy(server: PrefectServer, pool: str) -> dict[str, str]:
    """Every deployment of DEPLOYMENTS, with `from_source(...).deploy(...)`: name -> id."""
    script = ["import json", "from prefect import flow", "ids = {}"]
    for name, (function, extras) in DEPLOYMENTS.items():
        script.append(
            f"ids[{name!r}] = str(flow.from_source(source={str(FLOWS)!r}, "
            f"entrypoint='fidelity.py:{function}').deploy(name={name!r}, "
            f"work_pool_name={pool!r}, build=False, push=False, print_next_steps=False, "
            f"**{extras!r}))")
    script.append("print(json.dumps(ids))")
    out = subprocess.run([str(server.bin_dir / "python"), "-c", "\n".join(script)],
                         env=server.env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return ids


def start_worker(home: Path, pool: str, server: PrefectServer, marks: Path, warm: bool,
                 log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`flowhand start` on the pool with home/worker.toml: warm with the default settings (warm
    starts are on by default for the proven Prefect releases), cold with `--no-warm-start`."""
    worker_log = home / log_name
    argv = [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--config",
            str(home / "worker.toml"), "--name", pool]
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [*argv, *([] if warm else ["--no-warm-start"])],
            env={**server.env(), "FLOWHAND_STATE_DIR": str(home / "state"),
                 "FIDELITY_MARK_DIR": str(marks),
                 "FLOWHAND_PROCESS__WARM_MAX_HELPERS": "2"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return worker, worker_log


@contextlib.contextmanager
def open_fleet(version: str, warm: bool, home: Path, runs: Runs) -> Iterator[Fleet]:
    """A server of `version`, the flows deployed, flowhand serving the pool and `runs` created
    (they run in parallel); everything stopped afterwards, helpers and forked runs included."""
    env_dir = PREFECT_ENVS[version]
    if not (env_dir / "bin" / "prefect").exists():
        skip_or_fail(f"no Prefect {version} environment at {env_dir} (scripts/bootstrap.sh)")
    server = PrefectServer.start(home, env_dir=env_dir)
    api = API(server.api_url)
    fleet = None
    try:
        pool = api.create_pool(f"fidelity-{version}-{'warm' if warm else 'cold'}")
        deployments = deploy(server, pool)
        # No pull steps: the engine copies the flow's directory into its temporary one.
        deployments["fidelity-killed-copied"] = api.create_deployment(
            pool, name="fidelity-killed-copied", flow_name="killed", path=str(FLOWS),
            entrypoint="fidelity.py:killed")
        marks = home / "marks"
        marks.mkdir()
        (home / "worker.toml").write_text(WORKER_CONFIG)
        worker, worker_log = start_worker(home, pool, server, marks, warm, "worker.log")
        fleet = Fleet(version, warm, home, server, api, pool, marks, worker, worker_log,
                      deployments)
        fleet.create_runs(runs)
        yield fleet
    finally:
        if fleet is not None and fleet.worker.poll() is None:
            os.killpg(fleet.worker.pid, signal.SIGKILL)
            fleet.worker.wait()
        stop_helpers(home)
        api.http.close()
        server.stop()


def stop_helpers(home: Path) -> None:
    """Helpers leave on their own once flowhand is gone, and forked runs end with the server's
    stop: do not wait for either."""
    for record in home.glob("state/*/warm/runs/*.json"):
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError, OSError):
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
    for log in home.glob("worker*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"warm_start.helper_started"' in line:
                pid = json.loads(line)["pid"]
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def fleet_params() -> list[Any]:
    """(version, warm) for every tested Prefect version, cold and warm, with readable ids."""
    return [pytest.param((version, warm), id=f"{version}-{'warm' if warm else 'cold'}")
            for version in sorted(PREFECT_ENVS) for warm in (False, True)]
