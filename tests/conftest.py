from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
import structlog

from flowhand.api.client import PrefectClient
from flowhand.config import Config
from harness.postgres import Postgres
from tests.helpers import BUILD_SCRIPT, BUSYBOX, make_worker, worker_config
from tests.kube_cluster import (  # noqa: F401 (fixtures of the Kubernetes test cluster)
    kube,
    kube_cluster,
    kube_namespace,
    kubernetes_required,
    kwok_node,
    local_node,
    unavailable_reason,
)
from tests.prefect_env import API, PrefectServer, skip_or_fail

#: Fixtures that start or reach a real part: a test using one is `slow` (and `docker` for Docker).
SLOW_FIXTURES = {"prefect_server", "api", "make_config", "run_once", "docker_client", "busybox",
                 "auth_server", "csrf_server"}
DOCKER_FIXTURES = {"docker_client", "busybox"}
KUBE_FIXTURES = {"kube_cluster", "kube", "kube_namespace", "kwok_node", "local_node"}
#: Markers of real parts; each implies `slow`, so `-m "not slow"` alone is the fast path too.
REAL_PART_MARKERS = ("docker", "fleet", "real_flows", "kubernetes")


def pytest_configure(config: pytest.Config) -> None:
    """On the fast path (`-m "not slow ..."`, as `scripts/test --fast`), a test that starts a
    real server fails, saying so."""
    if "not slow" in (config.getoption("markexpr") or ""):
        for part in (PrefectServer, Postgres):
            part.start = _refused(part.__name__)  # type: ignore[method-assign,assignment]


def _refused(name: str) -> Callable[..., Any]:
    def start(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"a test on the fast path started a {name}: mark it (or its module) slow, "
                    "or give it a fixture listed in SLOW_FIXTURES (tests/conftest.py)")
    return start


def mark_real_parts(items: list[pytest.Item]) -> None:
    """Mark tests by the real parts they use (see the markers in pyproject.toml)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)
        if fixtures & KUBE_FIXTURES:
            item.add_marker(pytest.mark.kubernetes)
        if fixtures & SLOW_FIXTURES or any(item.get_closest_marker(m)
                                           for m in REAL_PART_MARKERS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the local Docker engine (a failure in CI, a skip elsewhere, when absent)."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        skip_or_fail(f"no Docker engine reachable: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def busybox(docker_client: docker.DockerClient) -> str:
    """The busybox test image, built (or found up to date) by scripts/build-test-images.sh."""
    subprocess.run([str(BUILD_SCRIPT)], check=True, capture_output=True, timeout=600)
    return BUSYBOX


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect 3.8.8 server on a free loopback port, SQLite under a temp PREFECT_HOME."""
    server = PrefectServer.start(tmp_path_factory.mktemp("prefect-home"))
    yield server
    server.stop()


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[API]:
    client = API(prefect_server.api_url)
    yield client
    client.http.close()


@pytest.fixture
def make_config(prefect_server: PrefectServer, tmp_path: Path) -> Callable[..., Config]:
    """Config for a worker against the test server; keyword arguments override keys."""

    def make(pool: str, **overrides: Any) -> Config:
        data: dict[str, Any] = {
            "pool": pool,
            "name": overrides.pop("name", "test-worker"),
            "poll_interval_seconds": 0.2,
            "state_dir": str(tmp_path / "state"),
            "api": {"url": prefect_server.api_url, "retry_base_seconds": 0.05},
            "logging": {"format": "json"},
            # Fast polls drive these tests; the event stream has its own (test_wakeups.py).
            "event_stream": {"enabled": False},
        }
        data.update(overrides)
        return worker_config(**data)

    return make


@pytest.fixture
def run_once(
    make_config: Callable[..., Config],
) -> Callable[..., list[dict[str, Any]]]:
    """Run one worker pass (`--run-once`) in-process; return the structured log events."""

    def run(pool: str, **overrides: Any) -> list[dict[str, Any]]:
        config = make_config(pool, **overrides)

        async def main() -> None:
            async with PrefectClient(config.api.url, worker_name=config.name,
                                     retry_base_seconds=0.05) as client:
                await make_worker(config, client).run(run_once=True)

        with structlog.testing.capture_logs() as logs:
            anyio.run(main)
        return logs

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked by the real parts they use; without Go (and no built cluster) the
    kubernetes tests are left out, said in one line at the end; under CI or
    FLOWHAND_REQUIRE_KUBERNETES=1 they run, and fail saying why."""
    mark_real_parts(items)
    kube_items = [item for item in items if item.get_closest_marker("kubernetes")]
    if not kube_items or kubernetes_required():
        return
    reason = unavailable_reason()
    if reason:
        config.hook.pytest_deselected(items=kube_items)
        items[:] = [item for item in items if item not in kube_items]
        config.stash[KUBE_SKIPPED] = f"SKIPPED {len(kube_items)} kubernetes tests: {reason}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if KUBE_SKIPPED in config.stash:
        terminalreporter.write_line(config.stash[KUBE_SKIPPED])


KUBE_SKIPPED = pytest.StashKey[str]()
