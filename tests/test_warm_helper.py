"""The warm helper's protocol with a stand-in `prefect` package (fast; the real flows are in
tests/test_warm_start.py): what a forked run gets, what the helper reports, how faults fall back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from flowhand.backends.base import BackendReports
from flowhand.backends.process import procfs
from flowhand.backends.process.warm import identity, memory
from flowhand.backends.process.warm.pool import WarmEngines, environment_key, open_pidfd
from flowhand.backends.process.warm.proven import PROVEN_PREFECT_SERIES, proven, series
from flowhand.backends.process.warm.settings import WarmSettings
from tests.prefect_env import PREFECT_ENVS

#: A stand-in engine: reports what it was given, then exits with FAKE_EXIT (or sleeps).
ENGINE = """
import json, os, sys, time
if __name__ == "__main__":
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "sid": os.getsid(0),
                      "pid": os.getpid(), "run": os.environ.get("PREFECT__FLOW_RUN_ID"),
                      "settings": __import__("prefect.context").context.SETTINGS}), flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def fake_prefect(tmp_path: Path) -> dict[str, str]:
    """A `prefect` package with the modules the helper touches, on PYTHONPATH."""
    root = tmp_path / "site" / "prefect"
    (root / "logging").mkdir(parents=True)
    (root / "__init__.py").write_text('__version__ = "3.9.1"\n')
    (root / "flow_engine.py").write_text("")
    (root / "engine.py").write_text(ENGINE)
    (root / "context.py").write_text(
        "import os\nSETTINGS = None\n"
        "def root_settings_context():\n"
        "    global SETTINGS\n    SETTINGS = os.environ.get('PREFECT_API_URL')\n"
        "    return SETTINGS\n")
    (root / "logging" / "__init__.py").write_text("")
    (root / "logging" / "configuration.py").write_text(
        "def setup_logging(incremental=None):\n    return {}\n")
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path / "site"),
            "PREFECT_API_URL": "http://127.0.0.1:1/api"}


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[WarmEngines]:
    """Warm engines under tmp_path; their helpers are stopped afterwards."""
    engines = WarmEngines(WarmSettings(warm_start=True), tmp_path / "state")
    yield engines
    for helper in engines._helpers.values():
        helper.process.kill()
        helper.process.wait()


async def _run(engines: WarmEngines, env: dict[str, str], tmp_path: Path,
               name: str) -> tuple[int | None, int | None, list[str]]:
    out = tmp_path / f"{name}.log"
    child = await engines.start(sys.executable, env, str(tmp_path), writer(out), uuid.uuid4())
    if child is None:
        return None, None, []
    pidfd = open_pidfd(child.pid)
    if pidfd is not None:
        await anyio.wait_readable(pidfd)
        os.close(pidfd)
    code = await child.exit_code()
    return child.pid, code, out.read_text().splitlines()


def test_forked_run_gets_its_environment_session_and_output(
        fake_prefect: dict[str, str], tmp_path: Path, engines: WarmEngines) -> None:
    """The child runs the engine as __main__ in its own session and directory, with the run's
    environment and rebuilt settings, writing to the given file; its status is reported."""
    run_id = str(uuid.uuid4())
    env = {**fake_prefect, "PREFECT__FLOW_RUN_ID": run_id, "FAKE_EXIT": "3"}
    pid, code, lines = anyio.run(_run, engines, env, tmp_path, "one")
    assert code == 3
    seen = json.loads(lines[0])
    assert seen["pid"] == pid and seen["sid"] == pid and seen["run"] == run_id
    assert seen["cwd"] == str(tmp_path) and seen["argv"][0].endswith("prefect/engine.py")
    assert seen["settings"] == "http://127.0.0.1:1/api"
    sockets = list((tmp_path / "state" / "warm").glob("*.sock"))
    assert [oct(s.stat().st_mode & 0o777) for s in sockets] == ["0o600"]


def test_deep_state_dir_still_forks_through_a_short_socket_address(
        fake_prefect: dict[str, str], tmp_path: Path) -> None:
    """A state_dir so deep that the socket's path exceeds a Unix socket address (108 bytes)
    still gets a warm start: helper and flowhand reach the socket through a directory fd."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    engines = WarmEngines(WarmSettings(warm_start=True), deep)
    try:
        pid, code, lines = anyio.run(_run, engines, fake_prefect, tmp_path, "deep")
    finally:
        for helper in engines._helpers.values():
            helper.process.kill()
            helper.process.wait()
    [sock] = (deep / "warm").glob("*.sock")
    assert len(str(sock)) > 108
    assert pid is not None and code == 0 and json.loads(lines[0])["pid"] == pid


def test_prefect_upgraded_under_a_helper_retires_it(
        fake_prefect: dict[str, str], tmp_path: Path, engines: WarmEngines) -> None:
    """Once Prefect's installation changes on disk, the helper refuses the next run (cold, the
    reason logged) and leaves; the run after that gets a new helper at once, no backoff."""

    async def scenario() -> None:
        _, code, _ = await _run(engines, fake_prefect, tmp_path, "before")
        [old] = engines._helpers.values()
        (Path(fake_prefect["PYTHONPATH"]) / "prefect" / "__init__.py").write_text(
            '__version__ = "3.9.2"\n')
        assert await engines.start(sys.executable, fake_prefect, str(tmp_path),
                                   writer(tmp_path / "c.log"), uuid.uuid4()) is None
        assert old.process.wait(10) == 0
        pid, code, _ = await _run(engines, fake_prefect, tmp_path, "after")
        [new] = engines._helpers.values()
        assert new is not old and pid is not None and code == 0

    anyio.run(scenario)


def test_killed_run_reports_the_signal_and_dead_helper_falls_back(
        fake_prefect: dict[str, str], tmp_path: Path, engines: WarmEngines) -> None:
    """A run killed by SIGKILL reports -9; after the helper is killed the next run starts cold
    (None: the reason is logged) and, after the backoff, on a restarted helper."""

    async def scenario() -> None:
        env = {**fake_prefect, "FAKE_SLEEP": "30"}
        child = await engines.start(sys.executable, env, str(tmp_path), writer(tmp_path / "k.log"),
                                    uuid.uuid4())
        assert child is not None
        os.killpg(child.pid, signal.SIGKILL)
        assert await child.exit_code() == -9
        [helper] = engines._helpers.values()
        helper.process.kill()
        helper.process.wait()
        assert await engines.start(sys.executable, fake_prefect, str(tmp_path),
                                   writer(tmp_path / "c.log"), uuid.uuid4()) is None
        await anyio.sleep(1.2)
        _, code, _ = await _run(engines, fake_prefect, tmp_path, "again")
        assert code == 0

    anyio.run(scenario)


def test_environment_key_ignores_per_run_variables() -> None:
    """Runs differing only in PREFECT__* share a helper; PREFECT_* or PYTHON* differences not."""
    base = {"PATH": "/bin", "PREFECT_API_URL": "u"}
    key = environment_key("/py", base)
    assert environment_key("/py", {**base, "PREFECT__FLOW_RUN_ID": "x", "HOME": "/h"}) == key
    assert environment_key("/py", {**base, "PREFECT_LOGGING_LEVEL": "DEBUG"}) != key
    assert environment_key("/py", {**base, "PYTHONPATH": "/x"}) != key
    assert environment_key("/other", base) != key


def test_identity_record_proves_pid_and_start_time(tmp_path: Path) -> None:
    """A record matches its run's PID and start time only; it is private to the user."""
    run = uuid.uuid4()
    pid = os.getpid()
    identity.write(tmp_path, run, pid, procfs.start_ticks(pid))
    record = next((tmp_path / "warm" / "runs").glob("*.json"))
    assert record.stat().st_mode & 0o777 == 0o600
    assert identity.matches(tmp_path, run, pid)
    assert not identity.matches(tmp_path, uuid.uuid4(), pid)
    assert not identity.matches(tmp_path, run, os.getppid())
    identity.write(tmp_path, run, pid, "1")  # a reused PID has another start time
    assert not identity.matches(tmp_path, run, pid)
    identity.remove(tmp_path, run)
    assert not identity.matches(tmp_path, run, pid)


def test_unproven_prefect_starts_cold_saying_why_once(
        fake_prefect: dict[str, str], tmp_path: Path) -> None:
    """A helper that imported a Prefect the suite does not run warm is stopped before it forks:
    its runs start cold, the reason logged once, every fallback counted; no helper stays."""
    (Path(fake_prefect["PYTHONPATH"]) / "prefect" / "__init__.py").write_text(
        '__version__ = "3.7.2"\n')
    events = BackendReports()
    engines = WarmEngines(WarmSettings(), tmp_path / "state", events.count)

    async def scenario() -> list[object]:
        with structlog.testing.capture_logs() as logs:
            for name in ("a", "b"):
                assert await engines.start(sys.executable, fake_prefect, str(tmp_path),
                                           writer(tmp_path / f"{name}.log"), uuid.uuid4()) is None
        return [entry for entry in logs if entry["event"] == "warm_start.fallback"]

    [said] = anyio.run(scenario)
    assert "Prefect is 3.7.2, not a release the compatibility suite runs warm (3.8.x, 3.9.x)" \
        in str(said)  # type: ignore[operator]
    assert events.counts() == {("warm_start_fallback", "unproven_prefect"): 2}
    assert engines._helpers == {}


def test_memory_under_the_budget_starts_cold_without_a_helper(
        fake_prefect: dict[str, str], tmp_path: Path) -> None:
    """With less memory available than warm_memory_budget no helper is started: the run starts
    cold, the reason naming both figures, counted as a memory fallback."""
    events = BackendReports()
    engines = WarmEngines(WarmSettings(warm_memory_budget="4096t"), tmp_path / "state",
                          events.count)
    with structlog.testing.capture_logs() as logs:
        assert anyio.run(engines.start, sys.executable, fake_prefect, str(tmp_path),
                         writer(tmp_path / "m.log"), uuid.uuid4()) is None
    [said] = [entry for entry in logs if entry["event"] == "warm_start.fallback"]
    assert "under warm_memory_budget (4294967296 MiB)" in said["reason"]
    assert events.counts() == {("warm_start_fallback", "memory"): 1}
    assert not (tmp_path / "state" / "warm").exists()


def test_forks_are_counted_with_the_helpers_prefect(
        fake_prefect: dict[str, str], tmp_path: Path) -> None:
    """A proven helper forks, and the fork is counted; the helper's log line names its Prefect."""
    events = BackendReports()
    engines = WarmEngines(WarmSettings(), tmp_path / "state", events.count)
    try:
        with structlog.testing.capture_logs() as logs:
            pid, code, _ = anyio.run(_run, engines, fake_prefect, tmp_path, "counted")
    finally:
        for helper in engines._helpers.values():
            helper.process.kill()
            helper.process.wait()
    assert pid is not None and code == 0
    assert events.counts() == {("warm_start_forked", ""): 1}
    [ready] = [entry for entry in logs if entry["event"] == "warm_start.helper_ready"]
    assert ready["prefect"] == "3.9.1"


def test_proven_series_are_the_ones_the_suite_runs_warm() -> None:
    """The one list of proven Prefect series names exactly the releases the compatibility suite
    installs (and runs cold and warm): adding either without the other fails here."""
    assert sorted({series(version) for version in PREFECT_ENVS}) == sorted(PROVEN_PREFECT_SERIES)
    assert proven("3.9.1") and proven("3.8.0") and not proven("3.10.0")
    assert not proven("2.9.1") and not proven(None) and not proven("3.1.0")


def test_memory_available_is_the_least_of_machine_and_cgroup_room(tmp_path: Path) -> None:
    """MemAvailable and the room under each cgroup limit (v2 and v1, up the tree): the least
    wins; an unlimited or unreadable level does not count."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 9000 kB\nMemAvailable:    4000 kB\n")
    (proc / "self" / "cgroup").write_text("4:memory:/a/b\n0::/x/y\n")
    assert memory.available_bytes(proc, cgroup) == 4000 * 1024
    (cgroup / "x" / "y").mkdir(parents=True)
    (cgroup / "x" / "y" / "memory.max").write_text("max\n")
    (cgroup / "x" / "memory.max").write_text(f"{3 << 20}\n")
    (cgroup / "x" / "memory.current").write_text(f"{1 << 20}\n")
    assert memory.available_bytes(proc, cgroup) == 2 << 20
    (cgroup / "memory" / "a" / "b").mkdir(parents=True)
    (cgroup / "memory" / "a" / "b" / "memory.limit_in_bytes").write_text(f"{2 << 20}\n")
    (cgroup / "memory" / "a" / "b" / "memory.usage_in_bytes").write_text(f"{(1 << 20) + 5}\n")
    assert memory.available_bytes(proc, cgroup) == (1 << 20) - 5
    assert memory.available_bytes(tmp_path / "none", tmp_path / "none") is None


def test_warm_settings_default_on_with_their_reason() -> None:
    """Warm starts are on by default with a budget of 512 MiB; the effective choice and its
    reason read as `flowhand config` shows them; sizes take units."""
    settings = WarmSettings()
    assert settings.warm_start and settings.warm_memory_budget == 512 << 20
    assert settings.warm_start_effective.startswith("on: runs of Prefect 3.8.x, 3.9.x fork")
    assert "512 MiB" in settings.warm_start_effective
    off = WarmSettings(warm_start=False, warm_memory_budget="1g")
    assert off.warm_start_effective.startswith("off (warm_start = false)")
    assert off.warm_memory_budget == 1 << 30
    assert "warm_start_effective" in off.model_dump()


def writer(path: Path) -> int:
    """A run's output descriptor, as the backend hands it on (the tests write to a file)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
