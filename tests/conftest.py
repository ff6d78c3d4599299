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
from flowhand.config import Config, load_config
from tests.helpers import BUILD_SCRIPT, BUSYBOX, make_worker
from tests.prefect_env import API, PrefectServer, skip_or_fail


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
        return load_config(None, data, environ={})

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
