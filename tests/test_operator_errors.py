"""Every configuration mistake is one line on stderr and exit 2, wherever it is found.

Each case runs the real `flowhand` console script in service mode (no --run-once) against a
real Prefect server, so mistakes found after start-up (inside the worker's task groups) are
covered, not only those the command line or the config file show.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import console
from tests.prefect_env import API, PrefectServer, free_port

#: The real console script against real or unreachable servers, waiting on the clock.
pytestmark = pytest.mark.slow

AUTH = "admin:right-password"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server that wants Basic auth (PREFECT_SERVER_API_AUTH_STRING)."""
    server = PrefectServer.start(tmp_path_factory.mktemp("auth-home"),
                                 extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH})
    yield server
    server.stop()


def start(server_url: str, tmp_path: Path, *args: str, **env: str) -> console.Result:
    environ = console.base_env(tmp_path, PREFECT_API_URL=server_url,
                               FLOWHAND_STATE_DIR=str(tmp_path / "state"), **env)
    return console.run("start", *args, env=environ, cwd=tmp_path, timeout=90)


def test_unknown_type(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """--type NAME that no backend has: exit 2 naming the available backends."""
    result = start(prefect_server.api_url, tmp_path, "--pool", "p", "--type", "ecs")
    console.assert_one_line_error(result, "unknown backend type 'ecs'",
                                  "available: docker, kubernetes, process")


def test_pool_of_an_unknown_type(api: API, prefect_server: PrefectServer, tmp_path: Path) -> None:
    """A pool whose type no backend serves, found after start-up: exit 2."""
    pool = api.create_pool(type="ecs")
    result = start(prefect_server.api_url, tmp_path, "--pool", pool)
    console.assert_one_line_error(result, "unknown backend type 'ecs'")


def test_docker_extra_not_installed(
    api: API, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """A docker pool without the docker package: exit 2 saying to install flowhand[docker]."""
    shim = tmp_path / "shim" / "docker"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'docker'\", name='docker')\n")
    pool = api.create_pool(type="docker")
    pythonpath = f"{shim.parent}:{os.environ.get('PYTHONPATH', '')}"
    result = start(prefect_server.api_url, tmp_path, "--pool", pool, PYTHONPATH=pythonpath)
    console.assert_one_line_error(result, "backend 'docker' cannot be loaded",
                                  "install flowhand[docker]")


def test_missing_work_queue(api: API, prefect_server: PrefectServer, tmp_path: Path) -> None:
    """A --work-queue the pool does not have: exit 2 saying how to create it."""
    pool = api.create_pool()
    result = start(prefect_server.api_url, tmp_path, "--pool", pool, "-q", "nope")
    console.assert_one_line_error(result, "work queue(s) 'nope' not found",
                                  "prefect work-queue create")


def test_pool_of_another_type(api: API, prefect_server: PrefectServer, tmp_path: Path) -> None:
    """--type process for a docker pool: exit 2 naming both types."""
    pool = api.create_pool(type="docker")
    result = start(prefect_server.api_url, tmp_path, "--pool", pool, "--type", "process")
    console.assert_one_line_error(result, "has type 'docker'", "'process' backend")


def test_missing_pool_without_create(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """--no-create-pool-if-not-found and no such pool: exit 2 saying how to create it."""
    pool = f"absent-{uuid.uuid4().hex[:6]}"
    result = start(prefect_server.api_url, tmp_path, "--pool", pool,
                   "--no-create-pool-if-not-found")
    console.assert_one_line_error(result, f"work pool '{pool}' not found",
                                  "prefect work-pool create")


def test_bad_base_job_template(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """--base-job-template with a missing file or a non-template: exit 2 naming the file."""
    result = start(prefect_server.api_url, tmp_path, "--pool", "p",
                   "--base-job-template", str(tmp_path / "none.json"))
    console.assert_one_line_error(result, "none.json: file not found")
    (tmp_path / "t.json").write_text(json.dumps({"variables": {}}))
    result = start(prefect_server.api_url, tmp_path, "--pool", "p",
                   "--base-job-template", str(tmp_path / "t.json"))
    console.assert_one_line_error(result, "'job_configuration' and 'variables'")


def test_url_that_is_not_the_api(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """PREFECT_API_URL without /api answers 404 for /health: exit 2 saying what it looks like."""
    root = prefect_server.api_url.removesuffix("/api")
    assert httpx.get(f"{root}/health").status_code == 404, "the premise of the test"
    result = start(root, tmp_path, "--pool", "p")
    console.assert_one_line_error(result, "is not a Prefect API URL", "ends in /api")


def test_unknown_profile(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """PREFECT_PROFILE naming a profile that does not exist: exit 2 listing those that do."""
    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "profiles.toml").write_text('[profiles.dev]\n')
    result = start(prefect_server.api_url, tmp_path, "--pool", "p", PREFECT_PROFILE="prod")
    console.assert_one_line_error(result, "PREFECT_PROFILE='prod'", "profiles there: dev")


def test_credentials_refused(auth_server: PrefectServer, tmp_path: Path) -> None:
    """A wrong auth string (401 from the server) ends the service at once: exit 2 naming the
    setting to check, with the secret nowhere in the output."""
    result = start(auth_server.api_url, tmp_path, "--pool", "p",
                   PREFECT_API_AUTH_STRING="admin:wrong-password")
    console.assert_one_line_error(result, "refused the credentials (401)",
                                  "PREFECT_API_AUTH_STRING")
    assert "wrong-password" not in result.stderr + result.stdout


def test_profile_credentials_reach_a_server_that_wants_them(
    auth_server: PrefectServer, tmp_path: Path
) -> None:
    """The URL and auth string of the active profile are used as `prefect worker start` uses
    them: a run is claimed and started, and the profile's other settings are in its env."""
    api = API(auth_server.api_url)
    api.http.auth = httpx.BasicAuth(*AUTH.split(":"))
    pool = api.create_pool()
    out = tmp_path / "env.json"
    dep = api.create_deployment(pool, job_variables={
        "command": f"sh -c 'env > {out}; sleep 1'"})
    run = api.create_run(dep)
    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "profiles.toml").write_text(
        f'active = "team"\n[profiles.team]\nPREFECT_API_URL = "{auth_server.api_url}"\n'
        f'PREFECT_API_AUTH_STRING = "{AUTH}"\nPREFECT_LOGGING_LEVEL = "DEBUG"\n')
    environ = console.base_env(tmp_path, FLOWHAND_STATE_DIR=str(tmp_path / "state"))
    result = console.run("start", "--pool", pool, "--run-once", env=environ, cwd=tmp_path,
                         timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert api.flow_run(run)["infrastructure_pid"], "claimed and started"
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["PREFECT_API_URL"] == auth_server.api_url
    assert env["PREFECT_API_AUTH_STRING"] == AUTH
    assert env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
    assert AUTH.split(":")[1] not in result.stderr
    api.http.close()


def test_stderr_has_no_traceback_for_an_unreachable_run_once(tmp_path: Path) -> None:
    """Not a configuration mistake: --run-once against nothing listening exits 1, one error
    line and no traceback."""
    url = f"http://127.0.0.1:{free_port()}/api"
    result = start(url, tmp_path, "--pool", "p", "--run-once", FLOWHAND_API__MAX_RETRIES="1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    events = [e["event"] for e in console.json_lines(result.stderr)]
    assert events.count("worker.api_unreachable") == 1, result.stderr
