"""A fleet under load: several `flowhand start` workers on one pool, racing and dying.

Real Prefect server on PostgreSQL (as in the bench), real worker processes (the console
script), the stand-in engine as each run's command (RUNNING, then COMPLETED after a few
seconds), each execution recorded as a file so that "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.postgres import Postgres
from tests.prefect_env import API, FINAL, PrefectServer, engine_command, skip_or_fail
from tests.tcp_proxy import TCPProxy

RUNS = int(os.environ.get("FLEET_TEST_RUNS", "300"))
#: The burst itself takes about a second a run on a loaded two-core machine (the server, three
#: workers and the engines share it); the promise under test is the lease plus a minute on top.
LEASE = 20.0
#: Flowhand settings for a fleet that notices a lost worker quickly.
FLEET_ENV = {
    "FLOWHAND_POLL_INTERVAL_SECONDS": "0.5",
    "FLOWHAND_WATCH_INTERVAL_SECONDS": "1",
    "FLOWHAND_HEARTBEAT_INTERVAL_SECONDS": "5",
    "FLOWHAND_CLAIM_LEASE_SECONDS": str(LEASE),
    "FLOWHAND_TAKEOVER_INTERVAL_SECONDS": "3",
    "FLOWHAND_LOGGING__FORMAT": "json",
    "FLOWHAND_LOGGING__LEVEL": "info",
    # A stopped worker leaves its runs to finish on their own (they are separate sessions).
    "FLOWHAND_SHUTDOWN__MODE": "detach",
}


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    try:
        postgres = Postgres()
        postgres.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        skip_or_fail(f"PostgreSQL cannot be started: {exc}")
        raise
    home = tmp_path_factory.mktemp("prefect-pg-home")
    server = PrefectServer.start(home, extra_env={
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url,
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
    })
    try:
        yield server
    finally:
        server.stop()
        postgres.stop()


@pytest.fixture
def pg_api(pg_server: PrefectServer) -> Iterator[API]:
    api = API(pg_server.api_url)
    yield api
    api.http.close()


class Fleet:
    """Worker processes on one pool, each logging JSON lines to its own file."""

    def __init__(self, server: PrefectServer, api_url: str, pool: str, tmp: Path) -> None:
        self.server = server
        self.api_url = api_url
        self.pool = pool
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.log_of: dict[str, Path] = {}

    def start(self, name: str, state_dir: Path, api_url: str | None = None,
              **env_extra: str) -> None:
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        self.log_of[name] = log
        env = {**self.server.env(), **FLEET_ENV, "PREFECT_API_URL": api_url or self.api_url,
               "FLOWHAND_STATE_DIR": str(state_dir), **env_extra}
        with log.open("wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "flowhand", "start", "--pool", self.pool, "--name", name],
                env=env, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def wait_started(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while '"worker.started"' not in self.log_of[name].read_text(errors="replace"):
            assert time.monotonic() < deadline, f"{name} did not start"
            assert self.procs[name].poll() is None, self.log_of[name].read_text()[-2000:]
            time.sleep(0.2)

    def events(self, event: str, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for log in [self.log_of[name]] if name else self.logs:
            for line in log.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event:
                    found.append(record)
        return found

    def claimed_by(self, log: Path) -> int:
        return log.read_text(errors="replace").count('"flow_run.claimed"')


def create_runs(api: API, deployment_id: str, count: int) -> list[str]:
    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: api.create_run(deployment_id), range(count)))


def wait_all_final(api: API, pool: str, run_ids: list[str], timeout: float) -> dict[str, str]:
    """{run id: final state type} once every run is final; fails with a summary otherwise."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {}
        offset = 0
        while True:
            page = api.call("POST", "/flow_runs/filter", json={
                "work_pools": {"name": {"any_": [pool]}}, "limit": 200, "offset": offset})
            states.update({r["id"]: r["state"]["type"] for r in page})
            if len(page) < 200:
                break
            offset += 200
        if all(states.get(i) in FINAL for i in run_ids):
            return states
        time.sleep(2)
    summary = Counter(states.get(i) for i in run_ids)
    stuck = [i for i in run_ids if states.get(i) not in FINAL][:5]
    details = [(i, api.flow_run(i).get("labels", {}).get("prefect.worker.name"),
                api.flow_run(i).get("infrastructure_pid"),
                [(s["type"], s["name"]) for s in api.history(i)]) for i in stuck]
    raise AssertionError(f"not all runs final after {timeout:.0f} s: {dict(summary)}; "
                         f"stuck: {details}")


def executions(marks: Path) -> Counter[str]:
    return Counter(name.split(".", 1)[0] for name in os.listdir(marks))


def assert_each_completed_once(api: API, pool: str, run_ids: list[str], marks: Path,
                               timeout: float) -> None:
    states = wait_all_final(api, pool, run_ids, timeout)
    not_completed = {i: states[i] for i in run_ids if states[i] != "COMPLETED"}
    assert not not_completed, (
        f"{len(not_completed)} runs not COMPLETED: {Counter(not_completed.values())}; e.g. "
        f"{[(i, api.state(i).get('message')) for i in list(not_completed)[:3]]}")
    counts = executions(marks)
    twice = {i: n for i, n in counts.items() if n > 1}
    never = [i for i in run_ids if counts[i] == 0]
    assert not twice, f"runs executed more than once: {twice}"
    assert not never, f"COMPLETED runs never executed: {never[:5]}"


def fleet_setup(api: API, tmp_path: Path, sleep: float = 3.0) -> tuple[API, str, str, Path]:
    pool = api.create_pool()
    marks = tmp_path / "marks"
    marks.mkdir()
    deployment = api.create_deployment(pool, {
        "command": engine_command("--sleep", str(sleep), "--mark", str(marks))})
    return api, pool, deployment, marks


def kill_mid_claim(fleet: Fleet, names: list[str], at_least: int = 3,
                   timeout: float = 180) -> str:
    """SIGKILL the first of these workers to have claimed a few runs (whichever polls first
    after the runs appear wins most races: a given one may claim nothing): it dies in the
    middle of its burst of claims, with proposals in flight. Its name."""
    deadline = time.monotonic() + timeout
    while True:
        for name in names:
            if fleet.claimed_by(fleet.log_of[name]) >= at_least:
                fleet.kill(name)
                return name
        assert time.monotonic() < deadline, f"none of {names} claimed {at_least} in {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("shared_state_dir", [True, False], ids=["shared-state-dir",
                                                                  "own-state-dirs"])
def test_fleet_worker_killed_mid_claim_and_restarted_loses_nothing(
        pg_server: PrefectServer, pg_api: API, tmp_path: Path, shared_state_dir: bool) -> None:
    """Three workers, 300 runs, one SIGKILLed mid-claim and restarted 5 s later: every run
    COMPLETED, each executed exactly once, within the lease plus a minute of the burst."""
    api, pool, deployment, marks = fleet_setup(pg_api, tmp_path)
    fleet = Fleet(pg_server, pg_server.api_url, pool, tmp_path)

    def state_dir(name: str) -> Path:
        return tmp_path / ("state" if shared_state_dir else f"state-{name}")

    try:
        for name in ("w1", "w0", "w2"):
            fleet.start(name, state_dir(name))
            fleet.wait_started(name)
        run_ids = create_runs(api, deployment, RUNS)
        killed = kill_mid_claim(fleet, ["w1", "w0", "w2"])
        time.sleep(5)
        fleet.start(killed, state_dir(killed))
        assert_each_completed_once(api, pool, run_ids, marks, timeout=LEASE + 60 + RUNS * 1.0)
        assert not fleet.events("flow_run.unexpected_error")
    finally:
        fleet.stop_all()


def test_fleet_worker_killed_for_good_its_claims_are_taken_over(
        pg_server: PrefectServer, pg_api: API, tmp_path: Path) -> None:
    """Three workers, 300 runs, one SIGKILLed mid-claim and never restarted: the survivors hand
    its lapsed claims back and run them; every run COMPLETED exactly once."""
    api, pool, deployment, marks = fleet_setup(pg_api, tmp_path)
    fleet = Fleet(pg_server, pg_server.api_url, pool, tmp_path)
    try:
        for name in ("w1", "w0", "w2"):
            fleet.start(name, tmp_path / "state")
            fleet.wait_started(name)
        run_ids = create_runs(api, deployment, RUNS)
        killed = kill_mid_claim(fleet, ["w1", "w0", "w2"])
        assert_each_completed_once(api, pool, run_ids, marks, timeout=LEASE + 60 + RUNS * 1.0)
        taken = fleet.events("flow_run.taken_over")
        assert len({e["flow_run_id"] for e in taken}) == len(taken), "a run was taken twice"
        assert all(e["worker"] != killed for e in taken), "the dead worker took runs over"
        for event in taken:
            assert any(s["name"] == "AwaitingRetry" and "handed this run back to the pool"
                       in (s.get("message") or "") for s in api.history(event["flow_run_id"]))
    finally:
        fleet.stop_all()


def test_partitioned_worker_does_not_run_what_was_handed_back(
        pg_server: PrefectServer, pg_api: API, tmp_path: Path) -> None:
    """A worker cut off from the API for longer than the lease, holding claims on runs due
    later: the survivor takes them over and runs them; the cut-off worker, back online, drops
    its stale claims (fenced) instead of running them a second time."""
    api, pool, deployment, marks = fleet_setup(pg_api, tmp_path, sleep=1.0)
    port = int(pg_server.api_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TCPProxy(port)
    fleet = Fleet(pg_server, pg_server.api_url, pool, tmp_path)
    try:
        # Only the partitioned worker runs at first, prefetching runs due in 15 s.
        fleet.start("cut", tmp_path / "state", api_url=f"http://127.0.0.1:{proxy.port}/api",
                    FLOWHAND_PREFETCH_SECONDS="60")
        due = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 15))
        run_ids = [api.create_run(deployment, state={"type": "SCHEDULED",
                                                    "state_details": {"scheduled_time": due}})
                   for _ in range(5)]
        deadline = time.monotonic() + 30
        while fleet.claimed_by(fleet.log_of["cut"]) < len(run_ids):
            assert time.monotonic() < deadline, "the worker did not prefetch the runs"
            time.sleep(0.1)
        proxy.cut()
        fleet.start("survivor", tmp_path / "state")
        fleet.wait_started("survivor")
        states = wait_all_final(api, pool, run_ids, timeout=LEASE + 60)
        assert set(states[i] for i in run_ids) == {"COMPLETED"}
        proxy.heal()
        # Back online, the cut-off worker settles each stale claim without running it: dropped
        # before the start (fenced), or, if building its job failed meanwhile, found finished.
        settled = {"flow_run.fenced", "flow_run.finished", "flow_run.handed_back"}
        deadline = time.monotonic() + 90
        while True:
            done = {e["flow_run_id"] for ev in settled for e in fleet.events(ev, "cut")}
            if done >= set(run_ids):
                break
            assert time.monotonic() < deadline, f"settled by the cut-off worker: {len(done)}"
            time.sleep(0.5)
        assert {i: api.state(i)["type"] for i in run_ids} == {i: "COMPLETED" for i in run_ids}
        assert executions(marks) == Counter({i: 1 for i in run_ids})
        assert len(fleet.events("flow_run.taken_over", "survivor")) == len(run_ids)
    finally:
        proxy.close()
        fleet.stop_all()


def test_second_worker_with_the_same_name_and_state_dir_refuses_to_start(
        pg_server: PrefectServer, pg_api: API, tmp_path: Path) -> None:
    """Two workers may share a state_dir, but not a name in it: the second exits 2, its error
    one line naming the process that holds the lock."""
    pool = pg_api.create_pool()
    fleet = Fleet(pg_server, pg_server.api_url, pool, tmp_path)
    try:
        fleet.start("same", tmp_path / "state")
        fleet.start("other", tmp_path / "state")
        fleet.wait_started("same")
        fleet.wait_started("other")
        env = {**pg_server.env(), **FLEET_ENV, "FLOWHAND_STATE_DIR": str(tmp_path / "state")}
        second = subprocess.run(
            [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--name", "same"],
            env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) <= 3 and "Traceback" not in second.stderr
        assert f"process {fleet.procs['same'].pid}" in lines[-1]
        assert fleet.procs["other"].poll() is None
        assert (tmp_path / "state" / "same").is_dir() and (tmp_path / "state" / "other").is_dir()
        assert oct(os.stat(tmp_path / "state").st_mode & 0o777) == "0o700"
    finally:
        fleet.stop_all()
