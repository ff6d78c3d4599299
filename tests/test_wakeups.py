"""The event stream against a real Prefect server: runs picked up as they fall due with polls
only a slow safety net, cancellations at once, and a lost stream falling back to fast polls.

Requests are counted at a loopback proxy (`tests/counting_proxy.py`) between the worker and
the server; latencies are asserted loosely (behaviour, not a benchmark: the machine is shared).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowhand.config import Config, load_config
from flowhand.worker import Worker
from tests.counting_proxy import CountingProxy
from tests.helpers import events, serve
from tests.prefect_env import API, PrefectServer, engine_command

POLL = "/get_scheduled_flow_runs"
#: The safety-net poll of these tests: far longer than any pick-up they assert.
SAFETY_NET = 30.0


@pytest.fixture
def proxy(prefect_server: PrefectServer) -> Iterator[CountingProxy]:
    port = int(prefect_server.api_url.rsplit(":", 1)[1].split("/")[0])
    counting = CountingProxy(port)
    yield counting
    counting.close()


@pytest.fixture
def stream_config(proxy: CountingProxy, tmp_path: Path) -> Callable[..., Config]:
    """A worker's config with the event stream on, talking to the server through `proxy`."""

    def make(pool: str, **overrides: Any) -> Config:
        data: dict[str, Any] = {
            "pool": pool, "name": "stream-worker", "state_dir": str(tmp_path / "state"),
            "poll_interval_seconds": 1.0, "watch_interval_seconds": 0.5,
            "api": {"url": f"http://127.0.0.1:{proxy.port}/api", "retry_base_seconds": 0.05},
            "event_stream": {"enabled": True, "poll_interval_seconds": SAFETY_NET},
            "logging": {"format": "json"},
            **overrides,
        }
        return load_config(None, data, environ={})

    return make


def drive(config: Config, scenario: Callable[[Worker], None],
          timeout: float = 120) -> list[dict[str, Any]]:
    """Serve in-process while `scenario(worker)` runs (in a thread), then stop; the log
    events. The scenario's failure is raised here."""
    failures: list[BaseException] = []

    def play(worker: Worker) -> bool:
        try:
            scenario(worker)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            failures.append(exc)
        return True

    logs = serve(config, play, timeout=timeout)
    if failures:
        raise failures[0]
    return logs


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def stream_open(worker: Worker, is_open: bool = True) -> None:
    assert worker.wakeups is not None
    wakeups = worker.wakeups
    wait_for(lambda: wakeups.healthy is is_open, 70,
             "the event stream opens" if is_open else "the stream's loss is seen")


def started_after_due(api: API, run: str) -> float:
    """Seconds from the run's scheduled time to its RUNNING state (both the server's clock)."""
    flow_run = api.flow_run(run)
    due = datetime.fromisoformat(flow_run["expected_start_time"])
    running = next(s for s in api.history(run) if s["type"] == "RUNNING")
    return (datetime.fromisoformat(running["timestamp"]) - due).total_seconds()


def test_idle_worker_starts_a_new_run_at_once(api: API, proxy: CountingProxy,
                                              stream_config: Callable[..., Config]) -> None:
    """On an idle worker whose next safety-net poll is 30 s away, a run created on the pool is
    RUNNING within a couple of seconds: its Scheduled event woke the poller, one poll took it."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    seen: dict[str, Any] = {}

    def scenario(worker: Worker) -> None:
        stream_open(worker)
        time.sleep(1.5)  # past the catch-up poll that opening the stream asks for
        created = time.monotonic()
        run = api.create_run(dep)
        seen["final"] = api.wait_final(run, 30)["type"]
        seen["latency"] = started_after_due(api, run)
        seen["polls"] = proxy.count("POST", POLL, since=created)

    drive(stream_config(pool), scenario)
    assert seen["final"] == "COMPLETED"
    assert seen["latency"] < 3.0, seen
    # The woken poll, maybe one more for a late event; never the fast interval's dozen.
    assert 1 <= seen["polls"] <= 2, seen


@pytest.mark.parametrize("prefetch", [10.0, 1.0], ids=["claimed-ahead", "timer"])
def test_run_due_later_starts_on_time_without_polls_between(
        api: API, proxy: CountingProxy, stream_config: Callable[..., Config],
        prefetch: float) -> None:
    """A run created 5 s ahead starts at its time, not before, with no periodic poll between:
    claimed ahead by the poll its event asked for (prefetch 10 s), or (prefetch 1 s) by the
    poll the look-ahead query timed just before it falls due."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    seen: dict[str, Any] = {}

    def scenario(worker: Worker) -> None:
        stream_open(worker)
        time.sleep(1.5)
        created = time.monotonic()
        due = datetime.now(UTC) + timedelta(seconds=5)
        run = api.create_run(dep, state={"type": "SCHEDULED",
                                         "state_details": {"scheduled_time": due.isoformat()}})
        seen["final"] = api.wait_final(run, 40)["type"]
        seen["latency"] = started_after_due(api, run)
        seen["polls"] = proxy.count("POST", POLL, since=created)
        seen["look_aheads"] = proxy.count("POST", "/flow_runs/filter", since=created,
                                          body_contains=b"NEXT_SCHEDULED_START_TIME_ASC")

    drive(stream_config(pool, prefetch_seconds=prefetch), scenario)
    assert seen["final"] == "COMPLETED"
    assert 0.0 <= seen["latency"] < 2.5, seen
    if prefetch >= 5:
        assert seen["polls"] == 1 and seen["look_aheads"] == 0, seen
    else:
        # The event's poll (too early), the look-ahead, the poll just in time.
        assert seen["polls"] == 2 and seen["look_aheads"] >= 1, seen


def test_lost_stream_falls_back_to_fast_polls_then_reopens(
        api: API, proxy: CountingProxy, stream_config: Callable[..., Config]) -> None:
    """With WebSockets cut at the proxy the worker says so in one line, polls at its fast
    interval and still starts runs; once they pass again it reopens the stream, picks runs up
    from events and polls slowly again."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={"command": engine_command()})
    seen: dict[str, Any] = {}

    def scenario(worker: Worker) -> None:
        stream_open(worker)
        proxy.cut_websockets()
        stream_open(worker, False)
        run = api.create_run(dep)
        seen["final_cut"] = api.wait_final(run, 30)["type"]
        window = time.monotonic()
        time.sleep(3.5)
        seen["polls_cut"] = proxy.count("POST", POLL, since=window)
        proxy.allow_websockets()
        stream_open(worker)
        time.sleep(1.5)
        created = time.monotonic()
        run = api.create_run(dep)
        seen["final_back"] = api.wait_final(run, 30)["type"]
        seen["latency_back"] = started_after_due(api, run)
        window = time.monotonic()
        time.sleep(3.5)
        seen["polls_back"] = proxy.count("POST", POLL, since=created)
        seen["polls_idle"] = proxy.count("POST", POLL, since=window)

    logs = drive(stream_config(pool), scenario)
    assert seen["final_cut"] == seen["final_back"] == "COMPLETED"
    assert seen["polls_cut"] >= 2, seen  # every 1 s while the stream is down
    assert seen["latency_back"] < 3.0 and seen["polls_back"] <= 2, seen
    assert seen["polls_idle"] == 0, seen
    warnings = [e for e in logs if e["event"].startswith("event_stream.")
                and e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["event_stream.lost"], warnings
    assert events(logs, "event_stream.open")[-1]["after_failures"] >= 1


def test_cancellation_arrives_through_the_stream(
        api: API, proxy: CountingProxy, stream_config: Callable[..., Config]) -> None:
    """A RUNNING run set to CANCELLING is stopped and CANCELLED within seconds, with no
    cancellation query sent after the request: the CANCELLING event did it."""
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "command": engine_command("--state", "none", "--sleep", "120")})
    seen: dict[str, Any] = {}

    def scenario(worker: Worker) -> None:
        stream_open(worker)
        run = api.create_run(dep)
        wait_for(lambda: api.state(run)["type"] == "RUNNING", 30, "the run is RUNNING")
        time.sleep(1.5)  # past the watchdog's first query for this run
        asked = time.monotonic()
        api.call("POST", f"/flow_runs/{run}/set_state",
                 json={"state": {"type": "CANCELLING"}, "force": True})
        seen["final"] = api.wait_final(run, 30)["type"]
        seen["seconds"] = time.monotonic() - asked
        seen["queries"] = proxy.count("POST", "/flow_runs/filter", since=asked,
                                      body_contains=b'"CANCELLING"')

    logs = drive(stream_config(pool, subprocess={"kill_grace_seconds": 2}), scenario)
    assert seen["final"] == "CANCELLED"
    assert seen["seconds"] < 5.0, seen
    assert seen["queries"] == 0, seen
    assert events(logs, "flow_run.cancel_requested", state="CANCELLING")


def test_counting_proxy_counts_requests_and_cuts_websockets(
        prefect_server: PrefectServer, proxy: CountingProxy) -> None:
    """The proxy counts each request of a kept-alive connection once, with its body, and a
    cut WebSocket upgrade never reaches the server."""
    url = f"http://127.0.0.1:{proxy.port}/api"
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
        client.post("/flow_runs/filter", json={"limit": 1})
    assert proxy.count("GET", "/health") == 3
    assert proxy.count("POST", "/flow_runs/filter", body_contains=b'"limit"') == 1
    proxy.cut_websockets()
    with pytest.raises(httpx.HTTPError), httpx.Client(base_url=url) as client:
        client.get("/events/out", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                           "Sec-WebSocket-Version": "13",
                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert proxy.requests[-1].websocket
