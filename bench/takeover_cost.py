"""What the fleet's take-over scan costs the API on an idle pool with 1,000 finished runs.

Starts a Prefect server (its own tool environment, SQLite), creates a pool with 1,000 runs that
ended COMPLETED, serves it with one flowhand worker in-process for `--minutes`, and counts the
worker's requests by endpoint through a counting httpx transport. Prints requests per minute,
all of them and the take-over scan's alone (the scan is `POST /flow_runs/filter` for PENDING
runs; the workers list is read only when a lapsed claim is found).

    .venv/bin/python -m bench.takeover_cost [--minutes 2] [--interval 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx

from flowhand.api.client import PrefectClient
from flowhand.backends import load_backend
from flowhand.config import create_backend, load_config
from flowhand.worker import Worker
from harness.api import API
from harness.prefect_server import PrefectServer


class Counting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.calls: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.split("/api", 1)[1]
        if path == "/flow_runs/filter":
            body = json.loads(request.content)
            kinds = body.get("flow_runs", {}).get("state", {}).get("type", {}).get("any_")
            path += f" {kinds}"
        self.calls[f"{request.method} {path}"] += 1
        response = await self.real.handle_async_request(request)
        await response.aread()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = PrefectServer.start(Path(tmp))
        try:
            api = API(server.api_url)
            pool = api.create_pool()
            deployment = api.create_deployment(pool, {"command": "true"})

            for _ in range(args.runs):  # one at a time: SQLite takes one writer
                api.create_run(deployment, state={"type": "COMPLETED"})
            config = load_config(None, {
                "pool": pool, "name": "bench-takeover", "state_dir": str(Path(tmp) / "state"),
                "takeover_interval_seconds": args.interval,
                "api": {"url": server.api_url}}, environ={})
            counting = Counting()

            async def serve() -> None:
                async with PrefectClient(config.api.url, transport=counting) as client:
                    worker = Worker(config, client,
                                    create_backend(load_backend("process"), config))
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(worker.run)
                        await anyio.sleep(args.minutes * 60)
                        worker.stop()

            started = time.monotonic()
            anyio.run(serve)
            minutes = (time.monotonic() - started) / 60
            scan = sum(n for k, n in counting.calls.items() if "['PENDING']" in k)
            total = sum(counting.calls.values())
            print(json.dumps({
                "finished_runs": args.runs, "minutes": round(minutes, 2),
                "takeover_interval_seconds": args.interval,
                "requests_per_minute": round(total / minutes, 1),
                "takeover_requests_per_minute": round(scan / minutes, 2),
                "by_endpoint": dict(counting.calls.most_common())}, indent=2))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
