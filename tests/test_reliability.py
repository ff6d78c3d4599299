"""Never lose a run: crash retries, cancellation, restart recovery, API outages, shutdown,
maximum run time and orphaned task runs, against a real server with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from flowhand.config import Config
from tests.console import json_lines
from tests.helpers import FaultProxy, RunOnce, events, serve
from tests.prefect_env import API, FINAL, PrefectServer, engine_command
from tests.waiting import wait_for


def start_cli(server: PrefectServer, pool: str, state_dir: Path, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--name", "cli-worker",
         *extra],
        env={**server.env(), "FLOWHAND_STATE_DIR": str(state_dir),
             "FLOWHAND_POLL_INTERVAL_SECONDS": "0.3", "FLOWHAND_WATCH_INTERVAL_SECONDS": "0.5",
             "FLOWHAND_LOGGING__FORMAT": "json", **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TestCrashRetries:
    def test_worker_policy_retries_then_gives_up(self, api: API, run_once: RunOnce) -> None:
        """With retry_crashed.max_retries = 1 a crash becomes AwaitingRetry naming the attempt,
        and the second crash is final."""
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--state", "none", "--exit", "3")}))
        logs = run_once(pool, retry_crashed={"max_retries": 1, "delay_seconds": 0})
        state = api.state(run)
        assert (state["type"], state["name"]) == ("SCHEDULED", "AwaitingRetry")
        assert "Attempt 1 crashed" in state["message"] and "status code 3" in state["message"]
        assert events(logs, "flow_run.retrying", attempt=1, status_code=3)
        run_once(pool, retry_crashed={"max_retries": 1, "delay_seconds": 0})
        state = api.state(run)
        assert state["type"] == "CRASHED" and "status code 3" in state["message"]

    def test_flow_retries_cover_a_crash_that_then_succeeds(
        self, api: API, run_once: RunOnce, tmp_path: Path
    ) -> None:
        """A run whose own policy has retries is retried after a crash and then completes,
        executing once per attempt, never twice at a time."""
        pool = api.create_pool()
        dep = api.create_deployment(pool, job_variables={
            "command": engine_command("--crash-once", str(tmp_path))})
        run = api.create_run(dep, empirical_policy={"retries": 2, "retry_delay": 0})
        run_once(pool)
        assert api.state(run)["name"] == "AwaitingRetry"
        run_once(pool)
        assert api.state(run)["type"] == "COMPLETED"
        names = [s["name"] for s in api.history(run)]
        assert names.count("AwaitingRetry") == 1 and names.count("Running") == 1

    def test_start_failures_are_retried_and_counted(self, api: API, run_once: RunOnce) -> None:
        """A run that cannot start is retried as configured, then CRASHED with the reason;
        attempts are counted even though the run never reached RUNNING."""
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": "no-such-command-xyz"}))
        for _ in range(2):
            run_once(pool, retry_crashed={"max_retries": 1, "delay_seconds": 0})
        state = api.state(run)
        assert state["type"] == "CRASHED" and "command not found" in state["message"]
        assert api.flow_run(run)["labels"]["flowhand.crash-retries"] == "1"


class TestCancellation:
    def test_running_run_is_stopped_and_cancelled(
        self, api: API, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A RUNNING run set to CANCELLING has its process group stopped within seconds and
        ends CANCELLED; its task runs are closed too."""
        marks = tmp_path / "marks"
        marks.mkdir()
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--state", "none", "--sleep", "120", "--mark", str(marks))}))
        task = api.call("POST", "/task_runs/", json={
            "flow_run_id": run, "task_key": "t", "dynamic_key": "0", "name": "t-0",
            "state": {"type": "RUNNING"}})
        marked: dict[str, float] = {}

        def until(worker: Any) -> bool:
            state = api.state(run)
            if state["type"] == "RUNNING" and "at" not in marked:
                api.call("POST", f"/flow_runs/{run}/set_state",
                         json={"state": {"type": "CANCELLING"}, "force": True})
                marked["at"] = time.monotonic()
            return state["type"] == "CANCELLED"

        logs = serve(make_config(pool, watch_interval_seconds=0.5,
                                 subprocess={"kill_grace_seconds": 2}), until)
        assert time.monotonic() - marked["at"] < 15
        pid = int(next(marks.iterdir()).name.split(".")[1])
        assert not pid_alive(pid)
        assert events(logs, "flow_run.cancel_requested", flow_run_id=run)
        assert api.call("GET", f"/task_runs/{task['id']}")["state"]["type"] == "CANCELLED"
        # The stand-in engine never opens the attempt-control session: signals only, logged.
        assert events(logs, "flow_run.stop_intent", flow_run_id=run, intent="cancel",
                      path="not_connected")

    @pytest.mark.parametrize("control", ["ignore", "drop"])
    def test_engine_that_ignores_or_drops_the_session_is_still_cancelled(
        self, api: API, make_config: Callable[..., Config], control: str
    ) -> None:
        """An engine that opens the attempt-control session but ignores the cancel intent, or
        drops the connection, is stopped by signals: CANCELLED, the path logged."""
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--state", "none", "--sleep", "120", "--control", control)}))
        asked: dict[str, bool] = {}

        def until(worker: Any) -> bool:
            state = api.state(run)
            if state["type"] == "RUNNING" and not asked:
                api.call("POST", f"/flow_runs/{run}/set_state",
                         json={"state": {"type": "CANCELLING"}, "force": True})
                asked["yes"] = True
            return state["type"] == "CANCELLED"

        logs = serve(make_config(pool, watch_interval_seconds=0.5,
                                 subprocess={"kill_grace_seconds": 2}), until)
        assert api.state(run)["type"] == "CANCELLED"
        assert events(logs, "flow_run.stop_intent", flow_run_id=run, intent="cancel",
                      path="not_acknowledged")

    def test_running_run_forced_to_cancelled_is_stopped(
        self, api: API, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A RUNNING run forced straight to CANCELLED (no CANCELLING) has its process stopped and
        stays CANCELLED; a CANCELLING run of another pool is left alone."""
        marks = tmp_path / "marks"
        marks.mkdir()
        pool, other_pool = api.create_pool(), api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--state", "none", "--sleep", "120", "--mark", str(marks))}))
        other = api.create_run(api.create_deployment(other_pool))
        # With infrastructure recorded, the server keeps CANCELLING (else it skips to CANCELLED).
        api.call("PATCH", f"/flow_runs/{other}", json={"infrastructure_pid": "elsewhere:1"})
        for state in ("PENDING", "RUNNING", "CANCELLING"):
            api.call("POST", f"/flow_runs/{other}/set_state",
                     json={"state": {"type": state}, "force": True})
        marked: dict[str, float] = {}

        def until(worker: Any) -> bool:
            state = api.state(run)
            if state["type"] == "RUNNING" and "at" not in marked:
                api.call("POST", f"/flow_runs/{run}/set_state",
                         json={"state": {"type": "CANCELLED"}, "force": True})
                marked["at"] = time.monotonic()
            return "at" in marked and not worker.runs

        logs = serve(make_config(pool, watch_interval_seconds=0.5,
                                 subprocess={"kill_grace_seconds": 2}), until)
        assert time.monotonic() - marked["at"] < 15
        pid = int(next(marks.iterdir()).name.split(".")[1])
        assert not pid_alive(pid)
        assert [e["state"] for e in events(logs, "flow_run.cancel_requested")] == ["CANCELLED"]
        assert api.state(run)["type"] == "CANCELLED"
        assert api.state(other)["type"] == "CANCELLING"

    def test_pending_run_cancelled_before_start_never_starts(
        self, api: API, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A run cancelled while the worker prepares it (PENDING) is never started."""
        marks = tmp_path / "marks"
        marks.mkdir()
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--mark", str(marks))}))

        async def slow_flow_read(request: httpx.Request, forward: Any) -> httpx.Response:
            if request.method == "GET" and "/flows/" in request.url.path:
                # Holding up job preparation leaves the run PENDING long enough to cancel it.
                await anyio.to_thread.run_sync(lambda: api.call(
                    "POST", f"/flow_runs/{run}/set_state",
                    json={"state": {"type": "CANCELLING"}, "force": True}))
                await anyio.sleep(2)
            return await forward()

        logs = serve(make_config(pool, watch_interval_seconds=0.3),
                     lambda w: api.state(run)["type"] in FINAL,
                     transport=FaultProxy(slow_flow_read))
        assert api.state(run)["type"] == "CANCELLED"
        assert not list(marks.iterdir()), "the run's command never ran"
        assert not events(logs, "flow_run.started")


class TestRecovery:
    def test_kill_9_in_the_middle_of_20_runs_leaves_none_stuck(
        self, api: API, prefect_server: PrefectServer, tmp_path: Path
    ) -> None:
        """kill -9 of the worker with 20 runs in flight: the next start re-attaches the
        processes still alive, reports the one that died meanwhile, hands back a claimed but
        unstarted run, and every run ends final, each executed once per attempt."""
        marks = tmp_path / "marks"
        marks.mkdir()
        state_dir = tmp_path / "state"
        pool = api.create_pool()
        dep = api.create_deployment(pool, job_variables={
            "command": engine_command("--sleep", "15", "--mark", str(marks)),
            "stream_output": False})
        runs = [api.create_run(dep) for _ in range(20)]
        first = start_cli(prefect_server, pool, state_dir)
        try:
            wait_for(lambda: len(list(marks.iterdir())) >= 20, 60, "20 runs started")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
        # While no worker watches: one run's process dies, and another run is claimed (by
        # this worker's name) but never started.
        victim = next(p for p in marks.iterdir() if pid_alive(int(p.name.split(".")[1])))
        victim_run, victim_pid = victim.name.split(".")
        os.kill(int(victim_pid), signal.SIGKILL)
        orphan = api.create_run(dep)
        api.call("POST", f"/flow_runs/{orphan}/set_state", json={"state": {"type": "PENDING"}})
        api.call("PATCH", f"/flow_runs/{orphan}/labels",
                 json={"prefect.worker.name": "cli-worker"})
        assert {api.state(r)["type"] for r in runs} <= {"PENDING", "RUNNING"}

        second = start_cli(prefect_server, pool, state_dir)
        try:
            wait_for(lambda: all(api.state(r)["type"] in FINAL for r in [*runs, orphan]), 90,
                     "all runs final")
        finally:
            second.send_signal(signal.SIGTERM)
            _, stderr = second.communicate(timeout=60)
        assert second.returncode == 0, stderr[-2000:]
        logged = json_lines(stderr)
        states = {r: api.state(r) for r in runs}
        assert states.pop(victim_run)["type"] == "CRASHED"
        assert all(s["type"] == "COMPLETED" for s in states.values()), states
        assert api.state(orphan)["type"] == "COMPLETED"
        assert any(e["event"] == "flow_run.handed_back" and e["flow_run_id"] == orphan
                   for e in logged)
        reattached = [e for e in logged if e["event"] == "flow_run.reattached"]
        assert len(reattached) >= 1
        executions = [p.name.split(".")[0] for p in marks.iterdir()]
        assert sorted(executions) == sorted([*runs, orphan]), "each run executed once"


class TestOutagesAndShutdown:
    def test_final_state_reported_after_an_api_outage(
        self, api: API, make_config: Callable[..., Config]
    ) -> None:
        """A run that crashes while the API is unreachable is reported CRASHED once the API is
        back; the worker keeps running through the outage."""
        pool = api.create_pool()
        run = api.create_run(api.create_deployment(pool, job_variables={
            "command": engine_command("--state", "none", "--sleep", "1", "--exit", "5")}))
        outage: dict[str, float] = {}

        async def handler(request: httpx.Request, forward: Any) -> httpx.Response:
            now = time.monotonic()
            if "start" in outage and now - outage["start"] < 6:
                raise httpx.ConnectError("injected outage", request=request)
            return await forward()

        def until(worker: Any) -> bool:
            state = api.state(run)
            if state["type"] == "RUNNING" and "start" not in outage:
                outage["start"] = time.monotonic()
            return state["type"] in FINAL

        config = make_config(pool, api={"url": make_config(pool).api.url, "max_retries": 1,
                                        "retry_base_seconds": 0.05})
        logs = serve(config, until, transport=FaultProxy(handler))
        state = api.state(run)
        assert state["type"] == "CRASHED" and "status code 5" in state["message"]
        assert events(logs, "flow_run.report_delayed", flow_run_id=run)

    @pytest.mark.parametrize("mode", ["drain", "reschedule", "detach"])
    def test_sigterm_shutdown_modes(
        self, mode: str, api: API, prefect_server: PrefectServer, tmp_path: Path
    ) -> None:
        """SIGTERM stops claiming at once; drain lets runs finish, reschedule stops them and
        hands them back, detach leaves them running for the next start to re-attach."""
        marks = tmp_path / "marks"
        marks.mkdir()
        pool = api.create_pool()
        dep = api.create_deployment(pool, job_variables={
            "command": engine_command("--sleep", "4", "--mark", str(marks)),
            "stream_output": False})
        run = api.create_run(dep)
        env = {"FLOWHAND_SHUTDOWN__MODE": mode, "FLOWHAND_SUBPROCESS__KILL_GRACE_SECONDS": "2"}
        worker = start_cli(prefect_server, pool, tmp_path / "state", env=env)
        wait_for(lambda: api.state(run)["type"] == "RUNNING", 60, "run RUNNING")
        worker.send_signal(signal.SIGTERM)
        late = api.create_run(dep)
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr[-2000:]
        assert api.state(late)["type"] == "SCHEDULED", "nothing claimed after the signal"
        pid = int(next(marks.iterdir()).name.split(".")[1])
        state = api.state(run)
        if mode == "drain":
            assert state["type"] == "COMPLETED"
        elif mode == "reschedule":
            assert (state["type"], state["name"]) == ("SCHEDULED", "AwaitingRetry")
            assert not pid_alive(pid)
        else:
            assert state["type"] == "RUNNING" and pid_alive(pid)
            again = start_cli(prefect_server, pool, tmp_path / "state", env=env)
            try:
                wait_for(lambda: api.state(run)["type"] in FINAL, 60, "re-attached run final")
            finally:
                again.send_signal(signal.SIGTERM)
                _, stderr = again.communicate(timeout=60)
            assert api.state(run)["type"] == "COMPLETED"
            assert any(e["event"] == "flow_run.reattached" for e in json_lines(stderr))
            assert len(list(marks.iterdir())) == 1 + 1, "the run and the late run, once each"


def test_maximum_run_time_stops_and_crashes_the_run(
    api: API, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A run over its max_run_seconds (job variable) is stopped and CRASHED, not retried."""
    marks = tmp_path / "marks"
    marks.mkdir()
    pool = api.create_pool()
    run = api.create_run(api.create_deployment(pool, job_variables={
        "command": engine_command("--sleep", "60", "--mark", str(marks)),
        "max_run_seconds": 2}))
    started = time.monotonic()
    serve(make_config(pool, watch_interval_seconds=0.3, subprocess={"kill_grace_seconds": 1},
                      retry_crashed={"max_retries": 3}),
          lambda w: api.state(run)["type"] in FINAL)
    state = api.state(run)
    assert state["type"] == "CRASHED"
    assert "Maximum run time of 2 s exceeded" in state["message"]
    assert time.monotonic() - started < 20
    assert not pid_alive(int(next(marks.iterdir()).name.split(".")[1]))


def test_orphaned_task_runs_are_closed_with_their_flow_run(api: API, run_once: RunOnce) -> None:
    """When flowhand crashes a flow run, its PENDING and RUNNING task runs crash with it;
    finished task runs are left alone."""
    pool = api.create_pool()
    run = api.create_run(api.create_deployment(pool, job_variables={
        "command": engine_command("--state", "none", "--exit", "9")}))
    tasks = {
        kind: api.call("POST", "/task_runs/", json={
            "flow_run_id": run, "task_key": kind, "dynamic_key": "0", "name": kind,
            "state": {"type": kind}})["id"]
        for kind in ("PENDING", "RUNNING", "COMPLETED")
    }
    run_once(pool)
    assert api.state(run)["type"] == "CRASHED"
    got = {k: api.call("GET", f"/task_runs/{t}")["state"]["type"] for k, t in tasks.items()}
    assert got == {"PENDING": "CRASHED", "RUNNING": "CRASHED", "COMPLETED": "COMPLETED"}
