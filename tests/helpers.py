"""Helpers that several test modules share: building and driving a worker in-process, injecting
faults between it and the server, reading its log events, and the busybox test image.

The Prefect server itself and the sync API client tests use to set things up are in
`tests/prefect_env.py`; pytest fixtures are in `tests/conftest.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import structlog

from flowhand.api.client import PrefectClient
from flowhand.backends import load_backend
from flowhand.config import Config, create_backend, load_config
from flowhand.worker import Worker
from tests.prefect_env import REPO

#: One `--run-once` pass in-process (the `run_once` fixture): pool, config overrides -> events.
RunOnce = Callable[..., list[dict[str, Any]]]

#: The test image built by scripts/build-test-images.sh; its `engine` script reports states.
BUSYBOX = "flowhand-test/busybox:1"
BUILD_SCRIPT = REPO / "scripts" / "build-test-images.sh"


def worker_config(**keys: Any) -> Config:
    """A worker's configuration from these keys alone (no file, no environment): how every test
    builds one, against the real server (the `make_config` fixture) or the in-memory API."""
    return load_config(None, keys, environ={})


def make_worker(config: Config, client: PrefectClient) -> Worker:
    backend_cls = load_backend(config.type or "process")
    return Worker(config, client, create_backend(backend_cls, config))


def events(logs: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


def busybox_vars(command: str, **extra: Any) -> dict[str, Any]:
    """Job variables running `command` in the busybox test image on the host network."""
    return {"image": BUSYBOX, "image_pull_policy": "Never", "network_mode": "host",
            "command": command, **extra}


def serve(config: Config, until: Callable[[Any], bool] | None, timeout: float = 60,
          transport: httpx.AsyncBaseTransport | None = None, run_once: bool = False,
          **client_options: Any) -> list[dict[str, Any]]:
    """Serve in-process until `until(worker)` holds (checked off the event loop), then stop;
    with `run_once`, one pass instead. The captured log events. `client_options` go to the
    PrefectClient (quick retries unless they say otherwise)."""
    options = {"worker_name": config.name, "retry_base_seconds": 0.05, **client_options}

    async def main() -> None:
        async with PrefectClient(config.api.url, transport=transport, **options) as client:
            worker = make_worker(config, client)
            if run_once or until is None:
                await worker.run(run_once=True)
                return

            async def watch() -> None:
                while not await anyio.to_thread.run_sync(until, worker):
                    await anyio.sleep(0.2)
                worker.stop()

            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await worker.run()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    return logs


Handler = Callable[[httpx.Request, Callable[[], Awaitable[httpx.Response]]],
                   Awaitable[httpx.Response]]


class FaultProxy(httpx.AsyncBaseTransport):
    """Forwards to the real server unless `handler` answers (or fails) first."""

    def __init__(self, handler: Handler) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.handler = handler
        self.calls: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls[f"{request.method} {request.url.path.split('/api', 1)[1]}"] += 1

        async def forward() -> httpx.Response:
            response = await self.real.handle_async_request(request)
            await response.aread()
            return response

        return await self.handler(request, forward)

    async def aclose(self) -> None:
        await self.real.aclose()
