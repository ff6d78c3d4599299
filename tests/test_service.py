"""The worker as a service: /healthz, /readyz and /metrics, and what the Prefect UI shows."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from prometheus_client.parser import text_string_to_metric_families

from flowhand.api.client import PrefectClient
from flowhand.config import Config
from tests.helpers import make_worker, serve
from tests.prefect_env import API, PrefectServer, engine_command, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_metrics_count_what_happened(
    api: API, make_config: Callable[..., Config]
) -> None:
    """/metrics reports claims, starts, completions, crashes and retries as they happened."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    good = [api.create_run(dep, job_variables={"command": engine_command()}) for _ in range(3)]
    bad = api.create_run(dep, job_variables={"command": engine_command("--state", "none",
                                                                       "--exit", "2")})
    retried = api.create_run(dep, job_variables={"command": "no-such-command-xyz"},
                             empirical_policy={"retries": 1, "retry_delay": 60})
    config = make_config(pool, http={"enabled": True, "port": 0})
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with PrefectClient(config.api.url) as client:
            worker = make_worker(config, client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)

                def done() -> bool:
                    states = [api.state(r)["type"] for r in [*good, bad]]
                    return all(s in ("COMPLETED", "CRASHED") for s in states) and \
                        api.state(retried)["name"] == "AwaitingRetry"

                while not await anyio.to_thread.run_sync(done):
                    await anyio.sleep(0.2)
                port = worker.http_port
                assert port is not None
                seen["metrics"] = await anyio.to_thread.run_sync(scrape, port)
                seen["healthz"] = await anyio.to_thread.run_sync(
                    lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code)
                seen["readyz"] = await anyio.to_thread.run_sync(
                    lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code)
                worker.stop()

    with structlog.testing.capture_logs():
        anyio.run(main)
    m = seen["metrics"]
    assert value(m, "flowhand_flow_runs_total", event="claimed", pool=pool) == 5
    assert value(m, "flowhand_flow_runs_total", event="started") == 4
    assert value(m, "flowhand_flow_runs_total", event="completed") == 3
    assert value(m, "flowhand_flow_runs_total", event="crashed") == 1
    assert value(m, "flowhand_flow_runs_total", event="retried") == 1
    assert value(m, "flowhand_claims_total", outcome="ACCEPT") == 5
    assert value(m, "flowhand_start_lateness_seconds_count") == 4
    assert value(m, "flowhand_poll_duration_seconds_count") >= 1
    assert value(m, "flowhand_free_slots", backend="process") == 200
    assert (seen["healthz"], seen["readyz"]) == (200, 200)


def test_readyz_follows_the_api(tmp_path: Path, make_config: Callable[..., Config]) -> None:
    """/readyz answers 503 with the reason while the API is down and 200 once it is back;
    /healthz stays 200 throughout because the worker's loop keeps turning."""
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    server = PrefectServer.start(home, port)
    config = make_config("ready-pool", http={"enabled": True, "port": 0},
                         api={"url": server.api_url, "max_retries": 0})
    seen: list[tuple[str, int, int, str]] = []

    async def main() -> None:
        nonlocal server
        async with PrefectClient(config.api.url, max_retries=0) as client:
            worker = make_worker(config, client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)

                async def probe(phase: str) -> None:
                    base = f"http://127.0.0.1:{worker.http_port}"
                    async with httpx.AsyncClient() as http:
                        ready = await http.get(f"{base}/readyz")
                        healthy = await http.get(f"{base}/healthz")
                    seen.append((phase, ready.status_code, healthy.status_code,
                                 ready.json()["reason"]))

                async def until_ready(want: int, within: float = 60) -> None:
                    deadline = time.monotonic() + within
                    while time.monotonic() < deadline:
                        if worker.http_port:
                            async with httpx.AsyncClient() as http:
                                got = await http.get(f"http://127.0.0.1:{worker.http_port}/readyz")
                            if got.status_code == want:
                                return
                        await anyio.sleep(0.2)

                await until_ready(200)
                await probe("up")
                await anyio.to_thread.run_sync(server.stop)
                await until_ready(503)
                await probe("down")
                server = await anyio.to_thread.run_sync(PrefectServer.start, home, port)
                await until_ready(200, within=90)
                await probe("back")
                worker.stop()

    try:
        with structlog.testing.capture_logs():
            anyio.run(main)
    finally:
        server.stop()
    assert [(p, r, h) for p, r, h, _ in seen] == [("up", 200, 200), ("down", 503, 200),
                                                ("back", 200, 200)]
    assert "ConnectError" in seen[1][3] or "unreach" in seen[1][3].lower(), seen[1][3]


def test_worker_events_reach_the_runs_logs(api: API, run_once: Callable[..., Any]) -> None:
    """The run's logs in the Prefect UI say the worker claimed it, started it, and how it ended,
    even when the flow never started."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    ok = api.create_run(dep, job_variables={"command": engine_command()})
    never = api.create_run(dep, job_variables={"command": "no-such-command-xyz"})
    run_once(pool)
    ok_logs = " | ".join(log["message"] for log in api.logs(ok))
    assert "claimed the run" in ok_logs and "started the run's infrastructure" in ok_logs
    assert "exited with status 0" in ok_logs
    never_logs = " | ".join(log["message"] for log in api.logs(never))
    assert "reported the run CRASHED" in never_logs and "command not found" in never_logs


def test_prefetched_runs_start_at_their_scheduled_time(
    api: API, make_config: Callable[..., Config]
) -> None:
    """Runs claimed early through prefetch start at their scheduled time, neither at claim time
    nor a poll interval late: RUNNING lands within a second after the scheduled time."""
    from datetime import UTC, datetime, timedelta

    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    due = datetime.now(UTC) + timedelta(seconds=4)
    runs = [api.create_run(dep, state={"type": "SCHEDULED", "state_details": {
        "scheduled_time": (due + timedelta(seconds=i)).isoformat()}}) for i in range(3)]
    config = make_config(pool)  # default prefetch (10 s): claimed seconds before they are due

    def all_done(worker: Any) -> bool:
        return all(api.state(r)["type"] == "COMPLETED" for r in runs)

    logs = serve(config, all_done)
    for run in runs:
        history = {s["type"]: s for s in api.history(run)}
        scheduled = datetime.fromisoformat(api.flow_run(run)["expected_start_time"])
        pending = datetime.fromisoformat(history["PENDING"]["timestamp"])
        running = datetime.fromisoformat(history["RUNNING"]["timestamp"])
        assert pending < scheduled - timedelta(seconds=1), "claimed early, through prefetch"
        lateness = (running - scheduled).total_seconds()
        assert 0 <= lateness < 1.0, lateness
    started = [e for e in logs if e["event"] == "flow_run.started"]
    assert all(0 <= e["lateness_seconds"] < 0.5 for e in started)


def test_status_command_shows_runs_in_flight_and_finished(
    api: API, run_once: Callable[..., Any], prefect_server: PrefectServer
) -> None:
    """`flowhand status` lists in-flight and recently finished runs with state, worker and
    infrastructure id, as an aligned table and as JSON."""
    import json
    import subprocess
    import sys

    pool = api.create_pool()
    dep = api.create_deployment(pool)
    done = api.create_run(dep, job_variables={"command": engine_command()})
    crashed = api.create_run(dep, job_variables={"command": engine_command("--exit", "3",
                                                                           "--state", "none")})
    run_once(pool)
    waiting = api.create_run(dep)
    api.call("POST", f"/flow_runs/{waiting}/set_state", json={"state": {"type": "PENDING"}})
    env = {**prefect_server.env()}
    table = subprocess.run([sys.executable, "-m", "flowhand", "status", "--pool", pool],
                           env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["RUN", "ID", "STATE"]
    assert lines[1].split()[2] == "PENDING/Pending"  # in flight first
    col = lines[0].index("STATE")
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines), "aligned"
    rows = json.loads(subprocess.run(
        [sys.executable, "-m", "flowhand", "status", "--pool", pool, "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True).stdout)
    by_id = {r["id"]: r for r in rows}
    assert by_id[done]["state"].startswith("COMPLETED") and by_id[done]["worker"] == "test-worker"
    assert by_id[crashed]["state"].startswith("CRASHED")
    assert by_id[done]["infrastructure"].split(":")[1].isdigit()
    assert by_id[done]["duration_s"] >= 0 and by_id[done]["lateness_s"] is not None
    assert by_id[waiting]["state"] == "PENDING/Pending"


def test_output_forwarding_to_run_logs_is_capped(api: API, run_once: Callable[..., Any]) -> None:
    """With forward_output the run's own output reaches its logs in the Prefect UI, up to
    max_output_bytes, and a line says where forwarding stopped."""
    pool = api.create_pool()
    dep = api.create_deployment(pool)
    chatty = api.create_run(dep, job_variables={"command": engine_command(
        "--print", "line-one-of-output"), "stream_output": False})
    flood = api.create_run(dep, job_variables={
        "command": "sh -c 'for i in $(seq 1 200); do echo flood-line-$i; done'",
        "stream_output": False})
    run_once(pool, run_logs={"forward_output": True, "max_output_bytes": 300})
    chatty_logs = [log["message"] for log in api.logs(chatty)]
    assert "line-one-of-output" in chatty_logs
    flood_logs = [log["message"] for log in api.logs(flood)]
    forwarded = [m for m in flood_logs if m.startswith("flood-line-")]
    assert 10 < len(forwarded) < 30, len(forwarded)
    assert any("max_output_bytes (300) reached" in m for m in flood_logs)
