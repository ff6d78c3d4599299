"""Shared reads: ReadCache (one read per key however many ask, errors not kept, expiry) and
FlowRunReader (reads of runs that end together batched into one request), the latter against the
real server."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest

from flowhand.api.batch import FlowRunReader
from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient
from flowhand.errors import APIUnreachable, NotFound
from tests.helpers import FaultProxy
from tests.prefect_env import API, PrefectServer


def test_concurrent_callers_share_one_read() -> None:
    """Twenty callers asking for the same key at once cause a single read and all get its value."""
    reads: list[str] = []

    async def fetch(key: str) -> str:
        reads.append(key)
        await anyio.sleep(0.05)
        return key.upper()

    async def main() -> list[str]:
        cache: ReadCache[str, str] = ReadCache(fetch, ttl_seconds=None)
        got: list[str] = []

        async def ask(key: str) -> None:
            got.append(await cache.get(key))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(ask, "a")
            tg.start_soon(ask, "b")
        return got

    got = anyio.run(main)
    assert sorted(reads) == ["a", "b"]
    assert got.count("A") == 20 and got.count("B") == 1


def test_a_failed_read_is_not_kept() -> None:
    """A read that fails raises for its callers, and the next call reads again."""
    attempts = 0

    async def fetch(key: str) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise APIUnreachable("server down")
        return attempts

    async def main() -> int:
        cache: ReadCache[str, int] = ReadCache(fetch, ttl_seconds=None)
        with pytest.raises(APIUnreachable):
            await cache.get("k")
        return await cache.get("k")

    assert anyio.run(main) == 2


def test_values_expire_after_their_ttl() -> None:
    """A value older than the TTL is read again; a fresh one is not."""
    reads = 0

    async def fetch(key: str) -> int:
        nonlocal reads
        reads += 1
        return reads

    async def main() -> list[int]:
        cache: ReadCache[str, int] = ReadCache(fetch, ttl_seconds=0.2)
        first, again = await cache.get("k"), await cache.get("k")
        await anyio.sleep(0.3)
        return [first, again, await cache.get("k")]

    assert anyio.run(main) == [1, 1, 2]


def test_reads_of_runs_ending_together_share_one_request(
    prefect_server: PrefectServer, api: API
) -> None:
    """Five concurrent reads (one of a run that does not exist) make one filter request; each
    caller gets its own run, and the missing one NotFound."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    runs = [api.create_run(dep) for _ in range(4)]
    missing = uuid.uuid4()

    async def forward(request: httpx.Request, forward: Any) -> httpx.Response:
        return await forward()

    proxy = FaultProxy(forward)
    got: dict[str, Any] = {}

    async def main() -> None:
        async with PrefectClient(prefect_server.api_url, transport=proxy) as client:
            reader = FlowRunReader(client)

            async def read(run_id: uuid.UUID) -> None:
                try:
                    got[str(run_id)] = (await reader.read(run_id)).id
                except NotFound as exc:
                    got[str(run_id)] = exc

            async with anyio.create_task_group() as tg:
                for run_id in [*map(uuid.UUID, runs), missing]:
                    tg.start_soon(read, run_id)

    anyio.run(main)
    assert dict(proxy.calls) == {"POST /flow_runs/filter": 1}
    assert {k: str(v) for k, v in got.items() if k != str(missing)} == {r: r for r in runs}
    assert isinstance(got[str(missing)], NotFound)


def test_a_failed_batch_fails_each_caller(prefect_server: PrefectServer, api: API) -> None:
    """When the batch request fails, every caller of the batch gets the error (and may retry)."""
    run = uuid.UUID(api.create_run(api.create_deployment(api.create_pool())))

    async def refuse(request: httpx.Request, forward: Any) -> httpx.Response:
        return httpx.Response(503, json={"detail": "database is locked"})

    async def main() -> list[str]:
        errors: list[str] = []
        async with PrefectClient(prefect_server.api_url, transport=FaultProxy(refuse),
                                 max_retries=0) as client:
            reader = FlowRunReader(client)

            async def read() -> None:
                try:
                    await reader.read(run)
                except APIUnreachable as exc:
                    errors.append(type(exc).__name__)

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(read)
        return errors

    assert anyio.run(main) == ["APIUnreachable"] * 3
