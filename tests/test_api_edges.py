"""Where Prefect's own client works, flowhand works: an API behind TLS with a private CA, a
server with CSRF protection on, a front end that rate-limits or restarts. Real Prefect servers,
real sockets, the real `flowhand` console script."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import console
from tests.http_proxy import FaultingHTTPProxy
from tests.prefect_env import (
    API,
    PrefectServer,
    deploy_hello,
    engine_command,
    free_port,
)
from tests.tls_proxy import LoopbackCA, TLSProxy, make_ca


@pytest.fixture(scope="module")
def tls_api(prefect_server: PrefectServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LoopbackCA]]:
    """The test server behind a TLS-terminating proxy whose CA was made for this module."""
    ca = make_ca(tmp_path_factory.mktemp("ca"))
    port = int(prefect_server.api_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TLSProxy(port, ca)
    yield f"https://127.0.0.1:{proxy.port}/api", ca
    proxy.close()


def _runs(api: API, pool: str, count: int) -> list[str]:
    dep = api.create_deployment(pool, job_variables={"command": engine_command(),
                                                     "stream_output": False})
    return [api.create_run(dep) for _ in range(count)]


def _assert_completed_once(api: API, run_ids: list[str]) -> None:
    """Each run COMPLETED, and reported once: one PENDING, one RUNNING, one COMPLETED."""
    for run_id in run_ids:
        assert api.state(run_id)["type"] == "COMPLETED", (run_id, api.state(run_id))
        kinds = [s["type"] for s in api.history(run_id)]
        for kind in ("PENDING", "RUNNING", "COMPLETED"):
            assert kinds.count(kind) == 1, (run_id, kinds)


def test_tls_with_the_ca_from_a_profile_runs_a_real_flow_and_stand_ins(
    prefect_server: PrefectServer, api: API, tls_api: tuple[str, LoopbackCA], tmp_path: Path
) -> None:
    """`flowhand --profile tls start --run-once` with PREFECT_API_SSL_CERT_FILE in that profile
    claims over https and the runs (a real flow among them) reach the API with the same CA."""
    url, ca = tls_api
    pool = api.create_pool()
    stand_ins = _runs(api, pool, 3)
    real = api.create_run(deploy_hello(prefect_server, pool))
    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "profiles.toml").write_text(
        f'active = "default"\n[profiles.default]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
        f'[profiles.tls]\nPREFECT_API_URL = "{url}"\nPREFECT_API_SSL_CERT_FILE = "{ca.ca_cert}"\n')
    env = console.base_env(tmp_path, FLOWHAND_STATE_DIR=str(tmp_path / "state"),
                           PATH=f"{prefect_server.bin_dir}:/usr/bin:/bin",
                           # `--profile` wins over the environment, as with `prefect --profile`.
                           PREFECT_API_URL="http://127.0.0.1:9/api")
    result = console.run("--profile", "tls", "start", "--pool", pool, "--run-once", env=env,
                         timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_completed_once(api, stand_ins)
    assert api.state(real)["type"] == "COMPLETED", api.state(real)
    assert any("hello, flowhand!" in entry["message"] for entry in api.logs(real))


def test_untrusted_certificate_is_one_line_naming_the_url_and_the_setting(
    api: API, tls_api: tuple[str, LoopbackCA], tmp_path: Path
) -> None:
    """Without the CA, start-up ends at once (exit 2) with one line naming the URL and
    PREFECT_API_SSL_CERT_FILE, as a service and with --run-once; no endless retry."""
    url, _ = tls_api
    env = console.base_env(tmp_path, PREFECT_API_URL=url,
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"))
    for flags in (["--run-once"], []):
        started = time.monotonic()
        result = console.run("start", "--pool", "p", *flags, env=env, timeout=60)
        assert time.monotonic() - started < 20
        line = console.assert_one_line_error(result, url, "PREFECT_API_SSL_CERT_FILE",
                                             "not trusted")
        assert "certificate" in line


def test_tls_insecure_skip_verify_works_and_warns_once(
    api: API, tls_api: tuple[str, LoopbackCA], tmp_path: Path
) -> None:
    """PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true: runs complete (the runs skip it too) and
    start-up says so in one warning line."""
    url, _ = tls_api
    pool = api.create_pool()
    run_ids = _runs(api, pool, 3)
    env = console.base_env(tmp_path, PREFECT_API_URL=url,
                           PREFECT_API_TLS_INSECURE_SKIP_VERIFY="true",
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"))
    result = console.run("start", "--pool", pool, "--run-once", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [e for e in console.json_lines(result.stderr) if e.get("event") == "api.tls_insecure"]
    assert len(warnings) == 1, result.stderr[-3000:]
    _assert_completed_once(api, run_ids)


@pytest.fixture
def csrf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect 3.8.8 server with CSRF protection on (its own home and database)."""
    home = tmp_path_factory.mktemp("csrf-home")
    server = PrefectServer.start(home, extra_env={
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"})
    yield server
    server.stop()


def _wait_completed(api: API, run_ids: list[str], timeout: float) -> None:
    for run_id in run_ids:
        state = api.wait_final(run_id, timeout=timeout)
        assert state["type"] == "COMPLETED", (run_id, state.get("message"),
                                              [e["message"] for e in api.logs(run_id)][-5:])


@pytest.mark.slow
def test_csrf_protected_server_before_and_after_a_restart_that_loses_the_tokens(
    csrf_server: PrefectServer, tmp_path: Path
) -> None:
    """With CSRF protection on, a real flow and 20 stand-in runs complete; the server restarts
    with its tokens gone, and 20 more complete under the same worker."""
    api = API(csrf_server.api_url)
    token = api.call("GET", "/csrf-token", params={"client": "test"})
    api.http.headers.update({"Prefect-Csrf-Token": token["token"], "Prefect-Csrf-Client": "test"})
    pool = api.create_pool()
    real = api.create_run(deploy_hello(csrf_server, pool))
    first = _runs(api, pool, 20)
    env = console.base_env(tmp_path, PREFECT_API_URL=csrf_server.api_url,
                           PATH=f"{csrf_server.bin_dir}:/usr/bin:/bin",
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"),
                           FLOWHAND_POLL_INTERVAL_SECONDS="0.5", FLOWHAND_LIMIT="8")
    worker = console.Running("start", "--pool", pool, env=env, stdout=None)
    try:
        _wait_completed(api, [real, *first], timeout=180)
        _assert_completed_once(api, first)
        csrf_server.stop()
        with sqlite3.connect(csrf_server.home / "prefect.db") as db:
            assert db.execute("SELECT count(*) FROM csrf_token").fetchone()[0] > 0
            db.execute("DELETE FROM csrf_token")
        port = int(csrf_server.api_url.rsplit(":", 1)[1].split("/")[0])
        restarted = PrefectServer.start(csrf_server.home, port=port, extra_env={
            "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"})
        csrf_server.process = restarted.process
        api.http.headers.update(
            {"Prefect-Csrf-Token": api.call("GET", "/csrf-token",
                                            params={"client": "test"})["token"]})
        second = _runs(api, pool, 20)
        _wait_completed(api, second, timeout=180)
        _assert_completed_once(api, second)
    finally:
        worker.stop()
    assert "Traceback" not in worker.stderr


def test_csrf_refusal_is_explained_not_blamed_on_credentials(
    csrf_server: PrefectServer, tmp_path: Path
) -> None:
    """With CSRF support turned off, the refused write is one line quoting the server's
    reason and naming the setting, not the API key."""
    env = console.base_env(tmp_path, PREFECT_API_URL=csrf_server.api_url,
                           PREFECT_CLIENT_CSRF_SUPPORT_ENABLED="false",
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"))
    result = console.run("start", "--pool", "new-pool", "--run-once", env=env)
    line = console.assert_one_line_error(result, "Missing CSRF token",
                                         "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED")
    assert "PREFECT_API_KEY" not in line


@pytest.mark.slow
@pytest.mark.parametrize(("statuses", "retry_after", "count"),
                         [((429,), "1", 50), ((502, 503), None, 20)],
                         ids=["rate-limited", "restarting-proxy"])
def test_rate_limits_and_a_restarting_proxy_slow_the_worker_and_lose_nothing(
    prefect_server: PrefectServer, api: API, tmp_path: Path,
    statuses: tuple[int, ...], retry_after: str | None, count: int,
) -> None:
    """A front end answering one request in three itself (429 with Retry-After: 1, or 502/503):
    every run completes, each reported once, and flowhand_api_waits_total counts the waits."""
    base = prefect_server.api_url.rsplit("/api", 1)[0]
    proxy = FaultingHTTPProxy(base, every=3, statuses=statuses, retry_after=retry_after)
    pool = api.create_pool()
    run_ids = _runs(api, pool, count)
    port = free_port()
    env = console.base_env(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{proxy.port}/api",
                           FLOWHAND_STATE_DIR=str(tmp_path / "state"),
                           FLOWHAND_POLL_INTERVAL_SECONDS="0.5",
                           FLOWHAND_HTTP__ENABLED="true", FLOWHAND_HTTP__PORT=str(port))
    worker = console.Running("start", "--pool", pool, env=env)
    try:
        _wait_completed(api, run_ids, timeout=300)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        code = worker.stop()
        proxy.close()
    assert code == 0, worker.stderr[-3000:]
    _assert_completed_once(api, run_ids)
    reason = "rate_limited" if 429 in statuses else "unavailable"
    waits = [line for line in metrics.splitlines()
             if line.startswith("flowhand_api_waits_total") and f'reason="{reason}"' in line]
    assert waits and float(waits[0].split()[-1]) > 0, metrics
    assert sum(proxy.faults.values()) > 0
