"""`flowhand start` takes `prefect worker start`'s flags with Prefect's meaning; stops are
clean from the first moment; an unreachable API is said at once; commands keep stdout clean.

Everything runs the real `flowhand` console script against a real Prefect server.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests import console
from tests.prefect_env import API, PrefectServer, engine_command, free_port

#: The real console script against real or unreachable servers, waiting on the clock.
pytestmark = pytest.mark.slow


def env_for(server: PrefectServer | str, tmp_path: Path, **extra: str) -> dict[str, str]:
    url = server if isinstance(server, str) else server.api_url
    return console.base_env(tmp_path, PREFECT_API_URL=url,
                            FLOWHAND_STATE_DIR=str(tmp_path / "state"),
                            FLOWHAND_POLL_INTERVAL_SECONDS="0.3", **extra)


def test_help_lists_every_prefect_flag_and_each_backend_once(tmp_path: Path) -> None:
    """`flowhand start --help` has every `prefect worker start` option; backends appear once."""
    result = console.run("start", "--help", env=console.base_env(tmp_path))
    assert result.returncode == 0
    for flag in ["--name", "-n", "--pool", "-p", "--work-queue", "-q", "--type", "-t",
                 "--prefetch-seconds", "--run-once", "--no-run-once", "--limit", "-l",
                 "--with-healthcheck", "--no-with-healthcheck", "--install-policy",
                 "--base-job-template", "--create-pool-if-not-found",
                 "--no-create-pool-if-not-found"]:
        assert f" {flag}" in result.stdout or f"[{flag}" in result.stdout, flag
    assert "backend: docker, kubernetes, process (" in " ".join(result.stdout.split())


def test_prefetch_seconds(api: API, prefect_server: PrefectServer, tmp_path: Path) -> None:
    """--prefetch-seconds decides how far ahead runs are claimed: a run due in 12 s is left
    alone with 0 and claimed (then started when due) with 30."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    due = datetime.now(UTC) + timedelta(seconds=12)
    run = api.create_run(dep, state={"type": "SCHEDULED",
                                     "state_details": {"scheduled_time": due.isoformat()}})
    env = env_for(prefect_server, tmp_path)
    result = console.run("start", "-p", pool, "--run-once", "--prefetch-seconds", "0", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert api.state(run)["type"] == "SCHEDULED"
    result = console.run("start", "-p", pool, "--run-once", "--prefetch-seconds", "30", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert api.state(run)["type"] == "COMPLETED"
    running = next(s for s in api.history(run) if s["type"] == "RUNNING")
    assert datetime.fromisoformat(running["timestamp"]) >= due


def test_base_job_template_and_create_pool(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """--base-job-template gives a pool flowhand creates its template; an existing pool keeps
    its own; --create-pool-if-not-found is the default and can be said."""
    template = json.loads((Path(__file__).parent.parent / "src" / "flowhand" / "templates"
                           / "process.json").read_text())
    template["variables"]["properties"]["marker"] = {"type": "string", "default": "from-file"}
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    pool = f"created-{time.time_ns()}"
    env = env_for(prefect_server, tmp_path)
    result = console.run("start", "-p", pool, "--run-once", "--create-pool-if-not-found",
                         "--base-job-template", str(path), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    created = api.call("GET", f"/work_pools/{pool}")
    assert created["type"] == "process"
    assert created["base_job_template"]["variables"]["properties"]["marker"]["default"] == \
        "from-file"
    own = json.loads(json.dumps(template))
    own["variables"]["properties"]["marker"]["default"] = "the-pool's-own"
    existing = api.create_pool(template=own)
    before = api.call("GET", f"/work_pools/{existing}")["base_job_template"]
    assert before["variables"]["properties"]["marker"]["default"] == "the-pool's-own"
    result = console.run("start", "-p", existing, "--run-once", "--base-job-template",
                         str(path), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert api.call("GET", f"/work_pools/{existing}")["base_job_template"] == before


def test_install_policy_is_accepted_with_one_line(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """--install-policy is accepted (Prefect's choices only) with one line saying flowhand
    installs nothing."""
    pool = api.create_pool()
    env = env_for(prefect_server, tmp_path)
    result = console.run("start", "-p", pool, "--run-once", "--install-policy", "always",
                         env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [e for e in console.json_lines(result.stderr) if e["event"] == "cli.install_policy"]
    assert len(lines) == 1 and "installs nothing" in lines[0]["note"]
    bad = console.run("start", "-p", pool, "--install-policy", "sometimes", env=env)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_healthcheck_follows_prefects_rule(tmp_path: Path, prefect_server: PrefectServer,
                                           api: API) -> None:
    """--with-healthcheck serves GET /health on PREFECT_WORKER_WEBSERVER_HOST:PORT from
    start-up, healthy while polling; --no-run-once keeps serving; --no-with-healthcheck wins
    over the config; the same port as [http] gives one listener with all endpoints."""
    port = free_port()
    pool = api.create_pool()
    env = env_for(prefect_server, tmp_path, PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
                  PREFECT_WORKER_WEBSERVER_PORT=str(port), FLOWHAND_HTTP__ENABLED="true",
                  FLOWHAND_HTTP__PORT=str(port))
    proc = console.Running("start", "-p", pool, "--run-once", "--no-run-once",
                           "--with-healthcheck", env=env)
    try:
        proc.wait_for("worker.started", 60)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert (health.status_code, health.json()) == (200, {"message": "OK"})
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        assert "flowhand_free_slots" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert proc.proc.poll() is None, "--no-run-once: still serving"
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr[-2000:]
    env["FLOWHAND_HEALTHCHECK__ENABLED"] = "true"
    env.pop("FLOWHAND_HTTP__ENABLED")
    proc = console.Running("start", "-p", pool, "--no-with-healthcheck", env=env)
    try:
        proc.wait_for("worker.started", 60)
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError("/health answered with --no-with-healthcheck")
        except httpx.ConnectError:
            pass
    finally:
        proc.stop()


def test_healthcheck_is_unhealthy_after_30_poll_intervals_without_a_poll(
    tmp_path: Path
) -> None:
    """With the API unreachable from the start, /health answers 200 within 30 poll intervals
    of start-up (PREFECT_WORKER_QUERY_SECONDS) and 503 with Prefect's message after."""
    port = free_port()
    env = env_for(f"http://127.0.0.1:{free_port()}/api", tmp_path,
                  PREFECT_WORKER_QUERY_SECONDS="0.1", PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
                  PREFECT_WORKER_WEBSERVER_PORT=str(port))
    env.pop("FLOWHAND_POLL_INTERVAL_SECONDS")
    proc = console.Running("start", "-p", "p", "--with-healthcheck", env=env)
    try:
        proc.wait_for("healthcheck.listening", 10)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        time.sleep(3.2)
        late = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert late.status_code == 503
        assert late.json() == {"message": "Worker may be unresponsive at this time"}
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr[-2000:]


def test_unreachable_api_is_said_at_once_and_a_stop_is_clean(tmp_path: Path) -> None:
    """The first line about an unreachable API comes within a second of start-up, naming the
    URL and the reason; later ones back off; SIGTERM during this start-up exits 0."""
    url = f"http://127.0.0.1:{free_port()}/api"
    proc = console.Running("start", "-p", "p", env=env_for(url, tmp_path))
    try:
        took = proc.wait_for("waiting for the Prefect API", 10)
        time.sleep(2.5)
    finally:
        code = proc.stop(timeout=10)
    rest = proc.stderr
    lines = console.json_lines(rest)
    starting = next(e for e in lines if e["event"] == "worker.starting")
    waits = [e for e in lines if e["event"] == "api.waiting"]
    first_word = (datetime.fromisoformat(waits[0]["timestamp"])
                  - datetime.fromisoformat(starting["timestamp"])).total_seconds()
    assert first_word < 1.0, f"first word {first_word:.2f} s after start-up"
    assert took < 10, f"first word {took:.1f} s after the process started (imports included)"
    assert waits[0]["message"].startswith(f"waiting for the Prefect API at {url}: ")
    assert "ConnectError" in waits[0]["message"] and waits[0]["message"].endswith("; retrying")
    delays = [e["retry_in_seconds"] for e in waits]
    assert len(waits) <= 4 and delays == sorted(delays), delays
    assert code == 0, rest[-2000:]
    assert proc.stdout() == "", "logs go to stderr only"


def test_a_second_signal_forces_the_exit(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """The first SIGINT stops claiming and drains; a second one forces the exit (130)."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "command": engine_command("--sleep", "30"), "stream_output": False})
    run = api.create_run(dep)
    proc = console.Running("start", "-p", pool, env=env_for(prefect_server, tmp_path))
    try:
        proc.wait_for("flow_run.started", 60)
        proc.send(signal.SIGINT)
        proc.wait_for("worker.draining", 30)
        assert proc.proc.poll() is None, "draining the run in flight"
    finally:
        code = proc.stop(timeout=30)
    assert code == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert api.state(run)["type"] == "RUNNING", "the run was left running"


def test_status_stdout_json_nulls_and_missing_pool(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """`flowhand status` keeps stdout for its output even at debug level, writes null for
    missing values in JSON, says when the pool does not exist (exit 2) and fails fast on an
    unreachable API (exit 1)."""
    pool = api.create_pool()
    run = api.create_run(api.create_deployment(pool))
    api.call("POST", f"/flow_runs/{run}/set_state", json={"state": {"type": "PENDING"}})
    env = env_for(prefect_server, tmp_path, FLOWHAND_LOGGING__LEVEL="debug")
    result = console.run("status", "-p", pool, "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["worker"] is None and rows[0]["infrastructure"] is None
    missing = console.run("status", "-p", "no-such-pool", env=env)
    console.assert_one_line_error(missing, "work pool 'no-such-pool' does not exist")
    assert missing.stdout == ""
    down = env_for(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    started = time.monotonic()
    result = console.run("status", "-p", pool, "--json", env=down)
    assert result.returncode == 1 and result.stdout == ""
    assert "cannot reach the Prefect API" in result.stderr
    assert time.monotonic() - started < 10
