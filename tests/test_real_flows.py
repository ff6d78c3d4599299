"""Real Prefect flows under flowhand, against what Prefect's own process worker gives them.

For each tested Prefect version, cold (`--no-warm-start`) and warm (the default settings: runs
forked by a helper that has imported Prefect, with the same outcomes): one server, one `flowhand start` process (the real
CLI) and the flows of tests/flows/fidelity.py deployed with `from_source(...).deploy(...)`
(tests/fidelity_fleet.py); every run is created up front so they run in parallel, and each test
then checks one behaviour, and that every run it waited for was started the fleet's way. What
each test expects is what `prefect worker start` gave for the same flow (see
docs/prefect-compatibility-flows.md).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fidelity_fleet import WORKSPACE, Fleet, Runs, fleet_params, open_fleet

#: The runs created when the fleet starts: case -> deployment (or deployment, job variables).
RUNS: Runs = {
    "killed_ws": ("fidelity-killed", WORKSPACE),
    "cancelled_ws": ("fidelity-sleeper", WORKSPACE),
    "completes": "fidelity-completes",
    "fails": "fidelity-fails",
    "flaky": "fidelity-flaky",
    "times_out": "fidelity-times-out",
    "killed": "fidelity-killed",
    "killed_copied": "fidelity-killed-copied",
    "cancelled": "fidelity-sleeper",
    "parent": "fidelity-parent",
    "suspends": "fidelity-suspends",
    "pauses": "fidelity-pauses",
    "serial_1": "fidelity-serial",
    "serial_2": "fidelity-serial",
    # Long enough for the engine to connect its control session even on a loaded machine.
    "overtime": ("fidelity-sleeper", {"max_run_seconds": 45}),
}


@pytest.fixture(scope="module", params=fleet_params())
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A Prefect server of one version, flowhand serving a pool on it (cold or warm), and every
    run started."""
    version, warm = request.param
    home = tmp_path_factory.mktemp(f"prefect-{version}-{'warm' if warm else 'cold'}")
    with open_fleet(version, warm, home, RUNS) as fleet:
        yield fleet


def test_completed_with_persisted_result_and_printed_lines(fleet: Fleet) -> None:
    """A flow of three tasks COMPLETES with its result persisted, its print() lines in the
    run's logs, and on_completion (only) run once."""
    state = fleet.wait_state("completes", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "COMPLETED", state
    assert state["data"] and state["data"].get("storage_key"), state
    # The engine sends its logs in batches, the last ones as it exits.
    fleet.wait_for("the print() line in the run's logs", lambda: any(
        "fidelity-print total=7" in log["message"]
        for log in fleet.api.logs(fleet.runs["completes"])))
    fleet.wait_for("on_completion", lambda: "completion" in fleet.hooks("completes"))
    assert fleet.hooks("completes") == {"completion": ["COMPLETED"]}


def test_raised_exception_is_failed_not_crashed(fleet: Fleet) -> None:
    """A flow that raises ends FAILED (not CRASHED) and runs on_failure only."""
    state = fleet.wait_state("fails", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "FAILED", state
    fleet.wait_for("on_failure", lambda: "failure" in fleet.hooks("fails"))
    assert fleet.hooks("fails") == {"failure": ["FAILED"]}


def test_flaky_flow_retries_in_process(fleet: Fleet) -> None:
    """retries=1 on a flow that fails once: COMPLETED with run_count 2."""
    state = fleet.wait_state("flaky", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "COMPLETED", state
    assert fleet.api.flow_run(fleet.runs["flaky"])["run_count"] == 2


def test_timeout_seconds_is_failed_timed_out(fleet: Fleet) -> None:
    """A flow over its timeout_seconds ends FAILED, named TimedOut."""
    state = fleet.wait_state("times_out", {"COMPLETED", "FAILED", "CRASHED"})
    assert (state["type"], state["name"]) == ("FAILED", "TimedOut"), state


def test_subflow_and_run_deployment_complete(fleet: Fleet) -> None:
    """A parent flow with an inline subflow and a run_deployment of a second deployment (run
    by the same worker) completes, and so does the child run."""
    state = fleet.wait_state("parent", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "COMPLETED", state
    children = fleet.api.call("POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [fleet.deployments["fidelity-child"]]}}})
    assert [c["state"]["type"] for c in children] == ["COMPLETED"], children


@pytest.mark.parametrize("case", ["killed", "killed_ws"])
def test_killed_engine_is_crashed_and_on_crashed_runs(fleet: Fleet, case: str) -> None:
    """An engine killed with SIGKILL ends CRASHED, and its on_crashed hook runs once (Prefect's
    worker runs it in a fresh process too), with the engine command or the supervisor."""
    state = fleet.wait_state(case, {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "CRASHED", state
    assert "-9" in state["message"] or "SIGKILL" in state["message"], state
    fleet.wait_for("on_crashed", lambda: "crashed" in fleet.hooks(case))
    # flowhand logs the hook process's end just after the hook wrote its mark.
    fleet.wait_for("the hook runner's end", lambda: bool(
        fleet.events("flow_run.hooks_ran", flow_run_id=fleet.runs[case], hook="on_crashed")))
    assert fleet.hooks(case) == {"crashed": ["CRASHED"]}


def test_killed_engine_of_a_deployment_without_pull_steps_runs_on_crashed(fleet: Fleet) -> None:
    """Without pull steps the engine copies the flow into flowhand's temporary directory; when
    it is killed, on_crashed still runs there (the directory is kept until the hooks ran)."""
    state = fleet.wait_state("killed_copied", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "CRASHED", state
    fleet.wait_for("on_crashed", lambda: "crashed" in fleet.hooks("killed_copied"))
    fleet.wait_for("the hook runner's end", lambda: bool(
        fleet.events("flow_run.hooks_ran", flow_run_id=fleet.runs["killed_copied"],
                     hook="on_crashed")))
    assert fleet.hooks("killed_copied") == {"crashed": ["CRASHED"]}
    ran = fleet.events("flow_run.hooks_ran", flow_run_id=fleet.runs["killed_copied"],
                     hook="on_crashed")
    fleet.wait_for("the temporary directory's removal",
                   lambda: not Path(ran[0]["working_directory"]).exists())


@pytest.mark.parametrize("case", ["cancelled", "cancelled_ws"])
def test_cancelled_run_runs_on_cancellation(fleet: Fleet, case: str) -> None:
    """Cancelling a running flow delivers the cancel intent before SIGTERM: on_cancellation
    runs once (seeing CANCELLING), no on_crashed, and the run ends CANCELLED; under Prefect's
    workspace supervisor flowhand runs the hook itself, as Prefect's worker does."""
    run_id = fleet.runs[case]
    fleet.wait_state(case, {"RUNNING"})
    # The engine connects once its flow starts; give it a moment, as a user would.
    fleet.wait_for("the engine's control session",
                   lambda: bool(fleet.events("flow_run.started", flow_run_id=run_id)))
    time.sleep(2)
    fleet.api.call("POST", f"/flow_runs/{run_id}/set_state",
                   json={"state": {"type": "CANCELLING"}, "force": True})
    state = fleet.wait_state(case, {"CANCELLED", "CRASHED", "COMPLETED", "FAILED"})
    assert state["type"] == "CANCELLED", state
    intents = fleet.events("flow_run.stop_intent", flow_run_id=run_id)
    assert [(e["intent"], e["path"]) for e in intents] == [("cancel", "acknowledged")], intents
    fleet.wait_for("on_cancellation", lambda: "cancellation" in fleet.hooks(case))
    assert fleet.hooks(case) == {"cancellation": ["CANCELLING"]}
    by_flowhand = fleet.events("flow_run.hooks_ran", flow_run_id=run_id, hook="on_cancellation")
    assert len(by_flowhand) == (1 if case == "cancelled_ws" else 0)


def test_run_over_its_maximum_run_time_is_crashed_naming_it_and_on_crashed_runs(
        fleet: Fleet) -> None:
    """Over max_run_seconds (job variable) the engine is told to relinquish the run and
    stopped: flowhand reports CRASHED naming the limit and runs on_crashed once, out of process,
    as for a killed engine."""
    run_id = fleet.runs["overtime"]
    state = fleet.wait_state("overtime", {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
    assert state["type"] == "CRASHED", state
    assert "Maximum run time of 45 s exceeded" in state["message"], state
    intents = fleet.events("flow_run.stop_intent", flow_run_id=run_id)
    assert [(e["intent"], e["path"]) for e in intents] == [("relinquish", "acknowledged")]
    fleet.wait_for("on_crashed", lambda: "crashed" in fleet.hooks("overtime"))
    fleet.wait_for("the hook runner's end", lambda: bool(
        fleet.events("flow_run.hooks_ran", flow_run_id=run_id, hook="on_crashed")))
    assert fleet.hooks("overtime") == {"crashed": ["CRASHED"]}


def test_suspended_run_is_paused_not_crashed_and_resumes(fleet: Fleet) -> None:
    """suspend_flow_run ends the process and leaves the run PAUSED (not CRASHED); a resume
    through the API has it picked up again and COMPLETED."""
    run_id = fleet.runs["suspends"]
    state = fleet.wait_state("suspends", {"PAUSED", "COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "PAUSED", state
    fleet.wait_for("the suspended engine to exit",
                   lambda: bool(fleet.events("flow_run.exited", flow_run_id=run_id)))
    time.sleep(1)
    assert fleet.api.state(run_id)["type"] == "PAUSED"
    fleet.api.call("POST", f"/flow_runs/{run_id}/resume", json={})
    state = fleet.wait_state("suspends", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "COMPLETED", state


def test_blocking_pause_resumed_through_api_completes(fleet: Fleet) -> None:
    """pause_flow_run keeps the engine waiting in PAUSED; a resume through the API completes
    the run in the same process."""
    run_id = fleet.runs["pauses"]
    state = fleet.wait_state("pauses", {"PAUSED", "COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "PAUSED", state
    fleet.api.call("POST", f"/flow_runs/{run_id}/resume", json={})
    state = fleet.wait_state("pauses", {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "COMPLETED", state
    assert len(fleet.events("flow_run.started", flow_run_id=run_id)) == 1


def test_deployment_concurrency_limit_runs_one_after_the_other(fleet: Fleet) -> None:
    """Two runs of a deployment with concurrency_limit 1 both complete, never at once."""
    spans = []
    for case in ("serial_1", "serial_2"):
        state = fleet.wait_state(case, {"COMPLETED", "FAILED", "CRASHED"})
        assert state["type"] == "COMPLETED", state
        run = fleet.api.flow_run(fleet.runs[case])
        spans.append((run["start_time"], run["end_time"]))
    first, second = sorted(spans)
    assert first[1] <= second[0], spans


def test_reschedule_shutdown_hands_running_flows_back(fleet: Fleet) -> None:
    """Stopping flowhand with [shutdown] mode = reschedule sends the reschedule intent: the
    engine exits without crashing the run, which goes back to the pool (AwaitingRetry)."""
    run_id = fleet.runs["resched"] = fleet.api.create_run(
        fleet.deployments["fidelity-sleeper"])
    fleet.wait_state("resched", {"RUNNING"})
    fleet.check_started_as_configured("resched")
    time.sleep(3)
    os.killpg(fleet.worker.pid, signal.SIGTERM)
    fleet.worker.wait(120)
    state = fleet.api.state(run_id)
    assert (state["type"], state["name"]) == ("SCHEDULED", "AwaitingRetry"), state
    intents = fleet.events("flow_run.stop_intent", flow_run_id=run_id)
    assert [(e["intent"], e["path"]) for e in intents] == [("reschedule", "acknowledged")]
    assert fleet.hooks("resched") == {}
