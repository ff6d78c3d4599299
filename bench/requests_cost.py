"""What each worker asks of the server, side by side: `prefect worker start` and flowhand (with
its event stream, the default) on one Prefect server, each behind a counting proxy
(`tests/counting_proxy.py`) that sees only the worker's own requests (the runs' engines talk
to the server directly, through the job's `env`).

    .venv/bin/python -m bench.requests_cost [--idle 120] [--one-by-one 8] [--burst 100]

Per worker, on a fresh pool: requests per minute on the idle pool; start latency (scheduled
time to RUNNING, the server's clock) of runs created one at a time on the idle pool; requests
per run over a burst of runs released together (created on a paused queue). A WebSocket
(Prefect's cancellation observer, flowhand's event stream) counts once, when it is opened.
The runs are the stand-in engine (`tests/engine.py`): it reports RUNNING then COMPLETED.
Prefect comes from `$FLOWHAND_PREFECT_ENV` (default `.tools/prefect`); the server uses SQLite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.environment import REPO, clean_env, say
from bench.server import BenchAPI
from harness.prefect_server import PrefectServer
from tests.counting_proxy import CountingProxy

PREFECT_ENV = Path(os.environ.get("FLOWHAND_PREFECT_ENV", REPO / ".tools" / "prefect"))
ENGINE = REPO / "tests" / "engine.py"
FLOWHAND = REPO / ".venv" / "bin" / "flowhand"


def start_worker(kind: str, pool: str, api_url: str, home: Path) -> subprocess.Popen[bytes]:
    env = {**clean_env(), "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / pool),
           "PATH": f"{PREFECT_ENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if kind == "prefect":
        argv = [str(PREFECT_ENV / "bin" / "prefect"), "worker", "start", "--pool", pool,
                "--type", "process"]
    else:
        env.update(FLOWHAND_STATE_DIR=str(home / f"state-{pool}"), FLOWHAND_LOGGING__FORMAT="json",
                   PYTHONPATH=str(REPO / "src"))
        argv = [str(FLOWHAND), "start", "--pool", pool]
    log = (home / f"{pool}.log").open("wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def by_path(proxy: CountingProxy, since: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in proxy.since(since):
        path = "/flow_runs/{id}" + r.path.rsplit("/", 1)[1] if r.path.count("/") > 2 and \
            r.path.startswith("/flow_runs/") else r.path
        counts[f"{'WS' if r.websocket else r.method} {path}"] += 1
    return dict(counts.most_common())


def create_run(api: BenchAPI, dep: str) -> str:
    """One run due now, waiting out a busy SQLite server's 503s."""
    for _ in range(30):
        with contextlib.suppress(httpx.HTTPStatusError):
            return api.create_run(dep)
        time.sleep(1)
    return api.create_run(dep)


def latency(api: BenchAPI, run: str) -> float:
    due = datetime.fromisoformat(api.flow_run(run)["expected_start_time"])
    running = next(s for s in api.history(run) if s["type"] == "RUNNING")
    return (datetime.fromisoformat(running["timestamp"]) - due).total_seconds()


def measure(kind: str, server: PrefectServer, api: BenchAPI, home: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    port = int(server.api_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CountingProxy(port)
    pool = api.create_pool(f"requests-{kind}")
    command = " ".join([str(REPO / ".venv" / "bin" / "python"), "-I", "-S", str(ENGINE)])
    dep = api.create_deployment(pool, {"command": command,
                                       "env": {"PREFECT_API_URL": server.api_url}})
    worker = start_worker(kind, pool, f"http://127.0.0.1:{proxy.port}/api", home)
    out: dict[str, Any] = {"worker": kind}
    try:
        while not api.workers(pool):
            time.sleep(0.5)
        time.sleep(15)  # past start-up
        say(f"{kind}: idle for {args.idle:g} s")
        start = time.monotonic()
        time.sleep(args.idle)
        idle = proxy.since(start)
        out["idle_requests_per_min"] = round(len(idle) * 60 / args.idle, 1)
        out["idle_requests"] = by_path(proxy, start)
        say(f"{kind}: {args.one_by_one} runs one at a time")
        latencies = []
        for _ in range(args.one_by_one):
            run = create_run(api, dep)
            api.wait_final(run, 120)
            latencies.append(round(latency(api, run), 3))
            time.sleep(3.7)  # so runs land at different points of a poll interval
        out["start_latency_s"] = latencies
        out["start_latency_p50_s"] = round(statistics.median(latencies), 3)
        say(f"{kind}: a burst of {args.burst}")
        api.pause_queue(pool, True)
        runs = [create_run(api, dep) for _ in range(args.burst)]
        time.sleep(2)
        start = time.monotonic()
        api.pause_queue(pool, False)
        deadline = time.monotonic() + 600
        while api.count_final(dep) < args.one_by_one + args.burst:
            if time.monotonic() > deadline:
                out["burst_status"] = "not all final after 600 s"
                break
            time.sleep(1)
        out["burst_seconds"] = round(time.monotonic() - start, 1)
        time.sleep(5)  # the last reports and log batches
        out["burst_requests_per_run"] = round(len(proxy.since(start)) / len(runs), 2)
        out["burst_requests"] = by_path(proxy, start)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        proxy.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=120.0)
    parser.add_argument("--one-by-one", type=int, default=8)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "requests.json")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="flowhand-requests-"))
    (home / "server").mkdir()
    server = PrefectServer.start(home / "server", env_dir=PREFECT_ENV)
    api = BenchAPI(server.api_url)
    results = []
    try:
        for kind in ("prefect", "flowhand"):
            results.append(measure(kind, server, api, home, args))
            say(json.dumps(results[-1]))
    finally:
        server.stop()
    load = os.getloadavg()
    report = {"load_average": [round(x, 1) for x in load], "nproc": os.cpu_count(),
              "results": results}
    prefect, flowhand = results
    for key in ("idle_requests_per_min", "burst_requests_per_run", "start_latency_p50_s"):
        if prefect.get(key):
            report[f"{key}_ratio"] = round(flowhand[key] / prefect[key], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
