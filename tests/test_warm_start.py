"""Warm starts with real Prefect flows: the same outcomes as cold starts, and every fault of a
helper ends in a cold start, never a failed run.

One Prefect server per tested version and one `flowhand start --warm-start` (the real CLI) with
the flows of tests/flows/fidelity.py, as in tests/test_real_flows.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_env import API, PREFECT_ENVS, PrefectServer, skip_or_fail
from tests.test_real_flows import WORKER_CONFIG, Fleet, _deploy

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
#: Runs that share the worker's environment, hence one helper.
RUNS = {
    "completes": "fidelity-completes",
    "fails": "fidelity-fails",
    "killed": "fidelity-killed",
    "cancelled": "fidelity-sleeper",
    "parent": "fidelity-parent",
}


def _start_worker(fleet_home: Path, pool: str, server: PrefectServer, marks: Path,
                  log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
    worker_log = fleet_home / log_name
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--config",
             str(fleet_home / "worker.toml"), "--name", "warm", "--warm-start"],
            env={**server.env(), "FLOWHAND_STATE_DIR": str(fleet_home / "state"),
                 "FIDELITY_MARK_DIR": str(marks),
                 "FLOWHAND_SUBPROCESS__WARM_MAX_HELPERS": "2"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return worker, worker_log


@pytest.fixture(scope="module", params=sorted(PREFECT_ENVS))
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A Prefect server, flowhand with warm starts serving a pool on it, the runs started."""
    version: str = request.param
    env_dir = PREFECT_ENVS[version]
    if not (env_dir / "bin" / "prefect").exists():
        skip_or_fail(f"no Prefect {version} environment at {env_dir} (scripts/bootstrap.sh)")
    home = tmp_path_factory.mktemp(f"warm-{version}")
    server = PrefectServer.start(home, env_dir=env_dir)
    api = API(server.api_url)
    fleet = None
    try:
        pool = api.create_pool(f"warm-{version}")
        deployments = _deploy(server, pool)
        marks = home / "marks"
        marks.mkdir()
        (home / "worker.toml").write_text(WORKER_CONFIG)
        worker, worker_log = _start_worker(home, pool, server, marks, "worker.log")
        fleet = Fleet(version, server, api, pool, marks, worker, worker_log, deployments)
        for case, deployment in RUNS.items():
            fleet.runs[case] = api.create_run(deployments[deployment])
        yield fleet
    finally:
        if fleet is not None and fleet.worker.poll() is None:
            os.killpg(fleet.worker.pid, signal.SIGKILL)
            fleet.worker.wait()
        _stop_helpers(home)
        api.http.close()
        server.stop()


def _helper_pids(fleet: Fleet) -> list[int]:
    return [e["pid"] for e in fleet.events("warm_start.helper_started")]


def _stop_helpers(home: Path) -> None:
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


def _forked(fleet: Fleet, case: str) -> bool:
    """The run was forked by a helper: its engine's parent was one (no fallback logged)."""
    return not fleet.events("warm_start.fallback", flow_run_id=fleet.runs[case])


def test_warm_run_completes_with_result_logs_and_hook(fleet: Fleet) -> None:
    """A three-task flow forked warm COMPLETES with its result, print() lines and hook."""
    state = fleet.wait_state("completes", FINAL)
    assert state["type"] == "COMPLETED", state
    assert state["data"] and state["data"].get("storage_key"), state
    fleet.wait_for("the print() line", lambda: any(
        "fidelity-print total=7" in log["message"]
        for log in fleet.api.logs(fleet.runs["completes"])))
    fleet.wait_for("on_completion", lambda: "completion" in fleet.hooks("completes"))
    assert fleet.hooks("completes") == {"completion": ["COMPLETED"]}
    assert len(_helper_pids(fleet)) >= 1 and _forked(fleet, "completes"), fleet.tail()


def test_warm_failed_and_subflow_runs(fleet: Fleet) -> None:
    """A raising flow is FAILED; a parent with a subflow and run_deployment COMPLETES."""
    assert fleet.wait_state("fails", FINAL)["type"] == "FAILED"
    assert fleet.wait_state("parent", FINAL)["type"] == "COMPLETED"
    assert _forked(fleet, "fails") and _forked(fleet, "parent")


def test_warm_killed_engine_is_crashed_with_the_signal(fleet: Fleet) -> None:
    """A forked engine killed with SIGKILL is CRASHED naming the signal (the helper reports the
    status) and its on_crashed hook runs."""
    state = fleet.wait_state("killed", FINAL)
    assert state["type"] == "CRASHED", state
    assert "-9" in state["message"] or "SIGKILL" in state["message"], state
    fleet.wait_for("on_crashed", lambda: "crashed" in fleet.hooks("killed"))
    assert _forked(fleet, "killed")


def test_warm_cancellation_uses_the_attempt_control_session(fleet: Fleet) -> None:
    """Cancelling a forked run delivers the cancel intent first: CANCELLED, on_cancellation."""
    run_id = fleet.runs["cancelled"]
    fleet.wait_state("cancelled", {"RUNNING"})
    fleet.wait_for("flow_run.started", lambda: bool(
        fleet.events("flow_run.started", flow_run_id=run_id)))
    time.sleep(2)
    fleet.api.call("POST", f"/flow_runs/{run_id}/set_state",
                   json={"state": {"type": "CANCELLING"}, "force": True})
    assert fleet.wait_state("cancelled", FINAL)["type"] == "CANCELLED"
    intents = fleet.events("flow_run.stop_intent", flow_run_id=run_id)
    assert [(e["intent"], e["path"]) for e in intents] == [("cancel", "acknowledged")]
    fleet.wait_for("on_cancellation", lambda: "cancellation" in fleet.hooks("cancelled"))
    assert _forked(fleet, "cancelled")


def test_other_environment_gets_another_helper_then_a_cold_start(fleet: Fleet) -> None:
    """A run whose PREFECT_* environment differs gets a second helper; a third key, over
    warm_max_helpers = 2, starts cold with the reason logged, and both complete."""
    deployment = fleet.deployments["fidelity-completes"]
    fleet.wait_for("the first helper", lambda: bool(_helper_pids(fleet)))
    fleet.runs["env2"] = fleet.api.create_run(
        deployment, job_variables={"env": {"PREFECT_LOGGING_LEVEL": "DEBUG"}})
    assert fleet.wait_state("env2", FINAL)["type"] == "COMPLETED"
    fleet.runs["env3"] = fleet.api.create_run(
        deployment, job_variables={"env": {"PREFECT_LOGGING_LEVEL": "WARNING"}})
    assert fleet.wait_state("env3", FINAL)["type"] == "COMPLETED"
    keys = {e["helper"] for e in fleet.events("warm_start.helper_started")}
    assert len(keys) == 2, fleet.events("warm_start.helper_started")
    assert _forked(fleet, "env2")
    [fallback] = fleet.events("warm_start.fallback", flow_run_id=fleet.runs["env3"])
    assert "warm_max_helpers" in fallback["reason"]


def test_helper_socket_removed_starts_cold_or_on_a_new_helper(fleet: Fleet) -> None:
    """With the helpers' sockets removed, the helpers leave and the next run still completes:
    cold with the reason logged when it came before flowhand noticed, else on a new helper."""
    before = _helper_pids(fleet)
    sockets = list((Path(fleet.worker_log).parent / "state").rglob("*.sock"))
    assert len(sockets) == 2, sockets
    for sock in sockets:
        sock.unlink()
    fleet.runs["nosock"] = fleet.api.create_run(fleet.deployments["fidelity-completes"])
    assert fleet.wait_state("nosock", FINAL)["type"] == "COMPLETED"
    fallbacks = fleet.events("warm_start.fallback", flow_run_id=fleet.runs["nosock"])
    assert ([f["reason"] for f in fallbacks] == ["cannot reach the helper: No such file or "
                                                  "directory"]
            or len(_helper_pids(fleet)) == len(before) + 1), (fallbacks, fleet.tail())
    fleet.wait_for("the old helpers to leave", lambda: not any(
        Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in before))


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_helper_killed_mid_burst(fleet: Fleet) -> None:
    """kill -9 of a helper with runs in flight: they still end (watched through pidfds), and
    later runs complete (cold, then through a restarted helper)."""
    deployment = fleet.deployments["fidelity-sleeper"]
    time.sleep(2.5)  # past the backoff of the previous test's dropped helper
    for case in ("burst_1", "burst_2"):
        fleet.runs[case] = fleet.api.create_run(deployment, parameters={"seconds": 8})
    for case in ("burst_1", "burst_2"):
        fleet.wait_state(case, {"RUNNING"})
    assert _forked(fleet, "burst_1") and _forked(fleet, "burst_2"), fleet.tail()
    os.kill(_helper_pids(fleet)[-1], signal.SIGKILL)
    for case in ("burst_1", "burst_2"):
        assert fleet.wait_state(case, FINAL)["type"] == "COMPLETED"
    for case in ("after_1", "after_2"):
        fleet.runs[case] = fleet.api.create_run(fleet.deployments["fidelity-completes"])
        assert fleet.wait_state(case, FINAL)["type"] == "COMPLETED"
        time.sleep(1.5)


def test_flowhand_killed_with_warm_runs_reattaches_them(fleet: Fleet) -> None:
    """kill -9 of flowhand with a forked run in flight: the run keeps running and the next
    flowhand re-attaches it through its identity record and sees it to COMPLETED."""
    fleet.runs["survivor"] = run_id = fleet.api.create_run(
        fleet.deployments["fidelity-sleeper"], parameters={"seconds": 10})
    fleet.wait_state("survivor", {"RUNNING"})
    assert _forked(fleet, "survivor")
    os.kill(fleet.worker.pid, signal.SIGKILL)
    fleet.worker.wait()
    home = Path(fleet.worker_log).parent
    fleet.worker, fleet.worker_log = _start_worker(home, fleet.pool, fleet.server, fleet.marks,
                                                   "worker-2.log")
    assert fleet.wait_state("survivor", FINAL)["type"] == "COMPLETED"
    fleet.wait_for("the re-attach", lambda: bool(
        fleet.events("flow_run.reattached", flow_run_id=run_id)))
