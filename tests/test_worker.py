"""The core worker against a real Prefect server, with real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
import structlog

from flowhand.api.client import PrefectClient
from flowhand.config import Config
from flowhand.errors import ConfigError
from tests.helpers import RunOnce, events, make_worker
from tests.prefect_env import API, REPO, PrefectServer, engine_command


def test_real_flow_completes_under_cli_run_once(
    prefect_server: PrefectServer, api: API, tmp_path: Path
) -> None:
    """A real @flow deployed with from_source().deploy() completes under `flowhand start --run-once`."""
    pool = api.create_pool()
    deploy = (
        "from prefect import flow\n"
        f"d = flow.from_source(source={str(REPO / 'tests' / 'flows')!r}, entrypoint='hello.py:hello')"
        f".deploy(name='hello-e2e', work_pool_name={pool!r}, build=False, push=False,"
        " print_next_steps=False, parameters={'name': 'flowhand'})\n"
        "print(d)\n"
    )
    env = prefect_server.env()
    out = subprocess.run([str(prefect_server.bin_dir / "python"), "-c", deploy], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    run_id = api.create_run(out.stdout.strip().splitlines()[-1])

    result = subprocess.run(
        [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--run-once"],
        env={**env, "FLOWHAND_STATE_DIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    run = api.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["infrastructure_pid"].split(":")[1].isdigit()
    messages = [log["message"] for log in api.logs(run_id)]
    assert any("hello, flowhand!" in m for m in messages), messages
    # The flow's own output was streamed to the worker's stdout (stream_output defaults on).
    assert "hello, flowhand!" in result.stdout


def test_crash_paths_are_explained_and_the_worker_keeps_serving(
    api: API, run_once: RunOnce, tmp_path: Path
) -> None:
    """Exit 3, SIGKILL, a missing command, a missing working dir and a silent exit 0 each end
    CRASHED with the right explanation while a healthy run in the same pass completes."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    cases = {
        "exit3": ({"command": engine_command("--state", "none", "--exit", "3", "--print",
                                             "boom-before-exit")},
                  ["non-zero status code 3", "unexpected status code", "boom-before-exit"]),
        "sigkill": ({"command": engine_command("--state", "none", "--kill-self", "SIGKILL")},
                    ["non-zero status code -9", "SIGKILL"]),
        "missing_cmd": ({"command": "no-such-command-xyz --flag"},
                        ["Failed to submit flow run to infrastructure", "command not found",
                         "no-such-command-xyz"]),
        "missing_dir": ({"command": engine_command(), "working_dir": str(tmp_path / "nope")},
                        ["Failed to submit", "working directory does not exist"]),
        "silent_exit0": ({"command": engine_command("--state", "none")},
                         ["status code 0", "without reporting a final state"]),
    }
    runs = {name: api.create_run(dep, job_variables=jv) for name, (jv, _) in cases.items()}
    good = api.create_run(dep, job_variables={"command": engine_command()})

    logs = run_once(pool)

    for name, (_, fragments) in cases.items():
        state = api.state(runs[name])
        assert state["type"] == "CRASHED", (name, state)
        for fragment in fragments:
            assert fragment in state["message"], (name, fragment, state["message"])
        assert events(logs, "flow_run.crashed", flow_run_id=runs[name]), name
        # The reason is also in the run's logs, for the Prefect UI.
        assert any(fragments[0] in log["message"] for log in api.logs(runs[name])), name
    assert api.state(good)["type"] == "COMPLETED"


def test_default_command_without_prefect_is_crashed_with_the_reason(
    api: API, run_once: RunOnce, tmp_path: Path
) -> None:
    """With no `command`, a run whose PATH has no `prefect`, or whose configured Python lacks
    Prefect, ends CRASHED saying so (never left PENDING); one with Prefect on PATH completes."""
    pool = api.create_pool()
    no_path = api.create_run(api.create_deployment(
        pool, job_variables={"env": {"PATH": str(tmp_path)}}))
    logs = run_once(pool)
    state = api.state(no_path)
    assert state["type"] == "CRASHED", state
    assert "no Prefect found" in state["message"] and "`prefect` is not on" in state["message"]
    assert events(logs, "flow_run.crashed", flow_run_id=no_path)

    pool = api.create_pool()
    no_prefect = api.create_run(api.create_deployment(pool))
    run_once(pool, subprocess={"python": sys.executable})
    state = api.state(no_prefect)
    assert state["type"] == "CRASHED", state
    assert f"Prefect is not installed for {sys.executable}" in state["message"]


def test_final_state_set_by_the_flow_is_not_overwritten(api: API, run_once: RunOnce) -> None:
    """A run that reported FAILED and then exited 1 stays FAILED: flowhand never overwrites it."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    run = api.create_run(dep, job_variables={
        "command": engine_command("--state", "FAILED", "--exit", "1")})
    logs = run_once(pool)
    assert api.state(run)["type"] == "FAILED"
    assert events(logs, "flow_run.finished", flow_run_id=run, state="FAILED")
    assert not events(logs, "flow_run.crashed")


def test_environment_working_dir_and_job_variables(
    api: API, run_once: RunOnce, tmp_path: Path, prefect_server: PrefectServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child gets Prefect's flow-run environment, the merged job env and the working dir."""
    marks = tmp_path / "marks"
    marks.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("FH_INHERITED", "inherited")
    monkeypatch.setenv("FH_REMOVED", "should-go")
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "env": {"FROM_DEPLOYMENT": "d", "OVERRIDDEN": "d"}, "working_dir": str(workdir)})
    run = api.create_run(dep, job_variables={
        "command": engine_command("--mark", str(marks)),
        "env": {"OVERRIDDEN": "r", "FH_REMOVED": None}})
    run_once(pool)
    assert api.state(run)["type"] == "COMPLETED"
    (mark,) = marks.iterdir()
    seen = json.loads(mark.read_text())
    env = seen["env"]
    assert seen["cwd"] == str(workdir)
    assert env["PREFECT__FLOW_RUN_ID"] == run
    assert env["PREFECT_API_URL"] == prefect_server.api_url
    assert env["PREFECT__WORKER_NAME"] == "test-worker"
    assert env["PREFECT__FLOW_NAME"] == "test-flow"
    assert env["PREFECT__DEPLOYMENT_ID"] == dep
    assert (env["FROM_DEPLOYMENT"], env["OVERRIDDEN"]) == ("d", "r")
    assert env["FH_INHERITED"] == "inherited"
    assert "FH_REMOVED" not in env
    assert api.flow_run(run)["labels"]["prefect.worker.name"] == "test-worker"


def test_temporary_working_dir_is_made_and_removed(
    api: API, run_once: RunOnce, tmp_path: Path
) -> None:
    """Without working_dir the run gets a fresh temporary directory, removed afterwards."""
    marks = tmp_path / "marks"
    marks.mkdir()
    pool = api.create_pool()
    run = api.create_run(api.create_deployment(pool), job_variables={
        "command": engine_command("--mark", str(marks))})
    run_once(pool)
    assert api.state(run)["type"] == "COMPLETED"
    cwd = json.loads(next(marks.iterdir()).read_text())["cwd"]
    assert "flowhand-" in cwd and not os.path.exists(cwd)


def test_missing_pool_is_created_with_the_process_template(api: API, run_once: RunOnce) -> None:
    """A missing pool is created as a process pool with Prefect's process template."""
    name = "created-by-flowhand"
    logs = run_once(name)
    pool = api.call("GET", f"/work_pools/{name}")
    assert pool["type"] == "process"
    assert set(pool["base_job_template"]["variables"]["properties"]) == {
        "command", "env", "labels", "name", "stream_output", "working_dir"}
    assert events(logs, "pool.created")


def test_empty_template_is_filled(api: API, run_once: RunOnce) -> None:
    """A pool created with an empty base job template gets flowhand's template."""
    pool = api.create_pool()  # the server creates it with {} as template
    assert api.call("GET", f"/work_pools/{pool}")["base_job_template"] == {}
    logs = run_once(pool)
    assert api.call("GET", f"/work_pools/{pool}")["base_job_template"]["job_configuration"]
    assert events(logs, "pool.template_filled")


def test_missing_queue_and_missing_pool_are_loud_errors(
    api: API, make_config: Callable[..., Config]
) -> None:
    """A queue that does not exist, or a pool that may not be created, stops start-up."""
    pool = api.create_pool()

    async def setup(config: Config) -> None:
        async with PrefectClient(config.api.url) as client:
            await make_worker(config, client).setup()

    with pytest.raises(ConfigError, match=r"work queue\(s\) 'typo' not found in pool"):
        anyio.run(setup, make_config(pool, work_queues=["default", "typo"]))
    with pytest.raises(ConfigError, match="not found and create_pool is false"):
        anyio.run(setup, make_config("no-such-pool", create_pool=False))


def test_pool_of_another_type_is_refused(api: API, make_config: Callable[..., Config]) -> None:
    """Serving a docker pool with the process backend is a configuration error."""
    pool = api.create_pool(type="docker")

    async def setup() -> None:
        config = make_config(pool, type="process")
        async with PrefectClient(config.api.url) as client:
            await make_worker(config, client).setup()

    with pytest.raises(ConfigError, match="has type 'docker'"):
        anyio.run(setup)


def test_queues_and_limit_bound_what_is_claimed(api: API, run_once: RunOnce) -> None:
    """Only runs of the configured queue are claimed, and no more than `limit` at a time."""
    pool = api.create_pool()
    api.call("POST", f"/work_pools/{pool}/queues", json={"name": "fast"})
    dep_default = api.create_deployment(pool, job_variables={"command": engine_command()})
    dep_fast = api.create_deployment(pool, job_variables={"command": engine_command()},
                                     work_queue_name="fast")
    other = api.create_run(dep_default)
    fast = [api.create_run(dep_fast) for _ in range(3)]
    run_once(pool, work_queues=["fast"], limit=2)
    states = [api.state(r)["type"] for r in fast]
    assert sorted(states) == ["COMPLETED", "COMPLETED", "SCHEDULED"]
    assert api.state(other)["type"] == "SCHEDULED"


def test_two_workers_never_run_the_same_flow_run(
    api: API, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Two workers serving one pool, 50 runs falling due at the same instant: every run
    executes exactly once (counted by a side effect) while both workers serve the pool."""
    from datetime import UTC, datetime, timedelta

    marks = tmp_path / "marks"
    marks.mkdir()
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "command": engine_command("--mark", str(marks)), "stream_output": False})
    due = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
    runs = [api.create_run(dep, state={"type": "SCHEDULED",
                                       "state_details": {"scheduled_time": due}})
            for _ in range(50)]

    def all_final() -> bool:
        states = api.call("POST", "/flow_runs/filter", json={
            "flow_runs": {"id": {"any_": runs}}, "limit": 200})
        return all(s["state"]["type"] == "COMPLETED" for s in states)

    async def serve(name: str) -> None:
        # A limit below 50 means neither worker can take everything: both must serve.
        config = make_config(pool, name=name, state_dir=str(tmp_path / name),
                             prefetch_seconds=0, limit=30)
        async with PrefectClient(config.api.url, worker_name=name) as client:
            worker = make_worker(config, client)

            async def watch() -> None:
                while not await anyio.to_thread.run_sync(all_final):
                    await anyio.sleep(0.5)
                worker.stop()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await worker.run()

    async def both() -> None:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve, "worker-a")
                tg.start_soon(serve, "worker-b")

    with structlog.testing.capture_logs() as logs:
        anyio.run(both)
    executions = [p.name.split(".")[0] for p in marks.iterdir()]
    assert sorted(executions) == sorted(runs), "each run executed exactly once"
    claimed = events(logs, "flow_run.claimed")
    assert len(claimed) == 50
    assert {e["worker"] for e in claimed} == {"worker-a", "worker-b"}, "both workers served"


def test_runs_later_than_max_late_are_left_alone_and_logged(api: API, run_once: RunOnce) -> None:
    """With max_late_seconds, a run due long ago is neither claimed nor forgotten: it is logged."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    old = api.create_run(dep, state={"type": "SCHEDULED",
                                     "state_details": {"scheduled_time": "2020-01-01T00:00:00Z"}})
    fresh = api.create_run(dep)
    logs = run_once(pool, max_late_seconds=3600)
    assert api.state(old)["type"] == "SCHEDULED"
    assert api.state(fresh)["type"] == "COMPLETED"
    assert events(logs, "poll.too_late_skipped", count=1)


def test_headers_and_secrets(
    api: API, prefect_server: PrefectServer, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """Requests carry a User-Agent the server's regex parses, the API version and the Bearer
    key; the key reaches the run's environment but never the worker's logs."""
    import re

    secret = "pnu_never_in_logs_123"

    async def probe() -> httpx.Response:
        async with PrefectClient(prefect_server.api_url, api_key=secret,
                                 worker_name="w") as client:
            return await client.request("GET", "/health")

    request = anyio.run(probe).request
    ua = request.headers["User-Agent"]
    assert re.match(r"^prefect/(\d+\.\d+\.\d+(?:[a-z.+0-9]+)?) \(API \S+\)$", ua), ua
    assert request.headers["X-PREFECT-API-VERSION"] == "0.8.4"
    assert request.headers["Authorization"] == f"Bearer {secret}"
    assert request.headers["X-Prefect-Worker-Name"] == "w"

    marks = tmp_path / "marks"
    marks.mkdir()
    pool = api.create_pool()
    run = api.create_run(api.create_deployment(pool, job_variables={
        "command": engine_command("--mark", str(marks))}))
    result = subprocess.run(
        [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--run-once"],
        env={**prefect_server.env(), "PREFECT_API_KEY": secret,
             "FLOWHAND_STATE_DIR": str(tmp_path / "state"), "FLOWHAND_LOGGING__LEVEL": "debug"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert api.state(run)["type"] == "COMPLETED"
    assert secret not in result.stderr and secret not in result.stdout
    env = json.loads(next(marks.iterdir()).read_text())["env"]
    assert env["PREFECT_API_KEY"] == secret
