"""Test helpers: one Worker run in-process against the in-memory API (tests/fake_api.py) and a
FakeBackend: fast tests of the worker's roles, no server and no process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from flowhand.api.client import PrefectClient
from flowhand.backends.base import Job
from flowhand.backends.fake import FakeBackend, Script
from flowhand.config import Config
from flowhand.worker import Worker
from tests.fake_api import POOL, FakeAPI
from tests.helpers import worker_config
from tests.waiting import until

__all__ = ["completes", "run_worker", "unit_config", "until"]


def unit_config(tmp_path: Path, **overrides: Any) -> Config:
    """A worker's configuration for the in-memory API: quick loops, no retries."""
    return worker_config(**{
        "pool": POOL, "name": "unit-worker", "state_dir": str(tmp_path / "state"),
        "poll_interval_seconds": 0.05, "watch_interval_seconds": 0.05,
        "prefetch_seconds": 0, "claim_lease_seconds": 2, "takeover_interval_seconds": 0.1,
        "api": {"url": "http://fake/api", "max_retries": 0}, **overrides})


def run_worker(api: FakeAPI, backend: FakeBackend, tmp_path: Path,
               body: Callable[[Worker], Awaitable[None]] | None = None,
               **overrides: Any) -> Worker:
    """Run a worker once (`run_once`), or as a service while `body(worker)` runs, then stop."""
    config = unit_config(tmp_path, **overrides)

    async def main() -> Worker:
        async with PrefectClient(config.api.url, transport=api.transport(), max_retries=0,
                                 sleep=lambda _: anyio.lowlevel.checkpoint()) as client:
            worker = Worker(config, client, backend)
            if body is None:
                with anyio.fail_after(10):
                    await worker.run(run_once=True)
                return worker
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                with anyio.fail_after(10):
                    await body(worker)
                worker.stop()
            return worker

    return anyio.run(main)


def completes(api: FakeAPI) -> Callable[[Job], Script]:
    """A backend script whose 'engine' reports RUNNING then COMPLETED, as Prefect's does."""
    def handler(job: Job) -> Script:
        run = api.runs[job.flow_run_id]
        api.set(run, "RUNNING")
        api.set(run, "COMPLETED")
        return Script(status_code=0)
    return handler

