"""Warm starts under faults, with real Prefect flows: whatever happens to a helper, the run
starts cold or on a new helper and completes; never a failed run.

One Prefect server per tested version and one `flowhand start` with its default settings (warm
starts on for these releases; the real CLI) with
the flows of tests/flows/fidelity.py (tests/fidelity_fleet.py). That warm runs end as cold ones
do is the compatibility suite's job: tests/test_real_flows.py runs every case cold and warm.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fidelity_fleet import FINAL, Fleet, open_fleet
from tests.prefect_env import PREFECT_ENVS


@pytest.fixture(scope="module", params=sorted(PREFECT_ENVS))
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A Prefect server, flowhand with warm starts (at most 2 helpers) serving a pool on it,
    and one run started so that the first helper exists."""
    version: str = request.param
    home = tmp_path_factory.mktemp(f"warm-{version}")
    with open_fleet(version, True, home, {"first": "fidelity-completes"}) as fleet:
        yield fleet


def _helper_pids(fleet: Fleet) -> list[int]:
    return [e["pid"] for e in fleet.events("warm_start.helper_started")]


def test_other_environment_gets_another_helper_then_a_cold_start(fleet: Fleet) -> None:
    """A run whose PREFECT_* environment differs gets a second helper; a third key, over
    warm_max_helpers = 2, starts cold with the reason logged, and both complete."""
    deployment = fleet.deployments["fidelity-completes"]
    fleet.wait_for("the first helper", lambda: bool(_helper_pids(fleet)))
    assert fleet.wait_state("first", FINAL)["type"] == "COMPLETED"
    fleet.runs["env2"] = fleet.api.create_run(
        deployment, job_variables={"env": {"PREFECT_LOGGING_LEVEL": "DEBUG"}})
    assert fleet.wait_state("env2", FINAL)["type"] == "COMPLETED"
    fleet.runs["env3"] = fleet.api.create_run(
        deployment, job_variables={"env": {"PREFECT_LOGGING_LEVEL": "WARNING"}})
    assert fleet.wait_state("env3", FINAL, check_start=False)["type"] == "COMPLETED"
    keys = {e["helper"] for e in fleet.events("warm_start.helper_started")}
    assert len(keys) == 2, fleet.events("warm_start.helper_started")
    assert fleet.forked("env2")
    [fallback] = fleet.events("warm_start.fallback", flow_run_id=fleet.runs["env3"])
    assert "warm_max_helpers" in fallback["reason"]


def test_helper_socket_removed_starts_cold_or_on_a_new_helper(fleet: Fleet) -> None:
    """With the helpers' sockets removed, the helpers leave and the next run still completes:
    cold with the reason logged when it came before flowhand noticed, else on a new helper."""
    before = _helper_pids(fleet)
    sockets = list((fleet.home / "state").rglob("*.sock"))
    assert len(sockets) == 2, sockets
    for sock in sockets:
        sock.unlink()
    fleet.runs["nosock"] = fleet.api.create_run(fleet.deployments["fidelity-completes"])
    assert fleet.wait_state("nosock", FINAL, check_start=False)["type"] == "COMPLETED"
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
    assert fleet.forked("burst_1") and fleet.forked("burst_2"), fleet.tail()
    os.kill(_helper_pids(fleet)[-1], signal.SIGKILL)
    for case in ("burst_1", "burst_2"):
        assert fleet.wait_state(case, FINAL)["type"] == "COMPLETED"
    for case in ("after_1", "after_2"):
        fleet.runs[case] = fleet.api.create_run(fleet.deployments["fidelity-completes"])
        assert fleet.wait_state(case, FINAL, check_start=False)["type"] == "COMPLETED"
        time.sleep(1.5)


def test_flowhand_killed_with_warm_runs_reattaches_them(fleet: Fleet) -> None:
    """kill -9 of flowhand with a forked run in flight: the run keeps running and the next
    flowhand re-attaches it through its identity record and sees it to COMPLETED."""
    fleet.runs["survivor"] = run_id = fleet.api.create_run(
        fleet.deployments["fidelity-sleeper"], parameters={"seconds": 10})
    fleet.wait_state("survivor", {"RUNNING"})
    assert fleet.forked("survivor")
    os.kill(fleet.worker.pid, signal.SIGKILL)
    fleet.worker.wait()
    fleet.restart_worker("worker-2.log")
    assert fleet.wait_state("survivor", FINAL)["type"] == "COMPLETED"
    fleet.wait_for("the re-attach", lambda: bool(
        fleet.events("flow_run.reattached", flow_run_id=run_id)))
