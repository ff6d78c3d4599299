"""Run output and state_dir on real small filesystems, through the real `flowhand` console script
and a real Prefect server: output never fills the disk nor fails a run, a killed worker's chatty
run waits for the next one, state_dir is private and refused in one line when it cannot be used.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests import console
from tests.console import Running, assert_one_line_error, base_env, json_lines
from tests.prefect_env import API, PrefectServer, free_port
from tests.tmpfs import fill, remount_read_only, tmpfs, used_bytes
from tests.waiting import wait_for

SPEW = Path(__file__).resolve().parent / "spew.py"
MB = 1 << 20


def spew_command(*args: str) -> str:
    return " ".join([sys.executable, str(SPEW), *args])


def worker_env(server: PrefectServer, home: Path, state_dir: Path, **extra: str) -> dict[str, str]:
    return base_env(home, PREFECT_API_URL=server.api_url, FLOWHAND_STATE_DIR=str(state_dir),
                    FLOWHAND_POLL_INTERVAL_SECONDS="0.3", FLOWHAND_WATCH_INTERVAL_SECONDS="0.5",
                    **extra)


@contextmanager
def usage_sampler(path: Path) -> Iterator[dict[str, int]]:
    """The peak of used bytes on `path`'s filesystem and its least free bytes, sampled every
    20 ms while the block runs."""
    seen = {"peak": 0, "least_free": 1 << 62}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            info = os.statvfs(path)
            seen["peak"] = max(seen["peak"], used_bytes(path))
            seen["least_free"] = min(seen["least_free"], info.f_bavail * info.f_frsize)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def progress(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def test_five_runs_printing_40_mb_each_complete_on_a_64_mb_state_dir(
    api: API, prefect_server: PrefectServer, tmp_path: Path,
) -> None:
    """Five runs print 40 MB each (200 MB, streamed to flowhand's stdout) with state_dir on a
    64 MB tmpfs: all COMPLETED, the tmpfs never holds more than a few hundred KB, and no output
    pipe is left behind."""
    with tmpfs(tmp_path / "state", "64m") as state:
        pool = api.create_pool()
        dep = api.create_deployment(pool, job_variables={"command": spew_command("--mb", "40")})
        runs = [api.create_run(dep) for _ in range(5)]
        before = used_bytes(state)
        with usage_sampler(state) as usage:
            result = subprocess.run(
                [console.FLOWHAND, "start", "--pool", pool, "--run-once", "--limit", "5",
                 "--name", "disk-worker"],
                env=worker_env(prefect_server, tmp_path, state), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        states = {r: api.state(r)["type"] for r in runs}
        assert set(states.values()) == {"COMPLETED"}, (states, result.stderr[-3000:])
        assert usage["peak"] - before < MB // 2, usage
        assert usage["least_free"] > 60 * MB, usage
        assert list((state / "disk-worker" / "runs").iterdir()) == []
    started = [e for e in json_lines(result.stderr) if e["event"] == "flow_run.started"]
    assert len(started) == 5


def test_a_full_state_dir_fails_no_run_and_pauses_claiming(
    api: API, prefect_server: PrefectServer, tmp_path: Path,
) -> None:
    """A run starts, then state_dir's tmpfs is filled to the last byte; the run prints 20 MB and
    COMPLETES. A new run is not claimed while the disk is full: /readyz answers 503 with the
    reason, said once on stderr; once space is freed it is claimed and completes."""
    started, go = tmp_path / "started", tmp_path / "go"
    port = free_port()
    with tmpfs(tmp_path / "state", "16m") as state:
        pool = api.create_pool()
        chatty = api.create_deployment(pool, job_variables={
            "command": spew_command("--mb", "20", "--started", str(started), "--go", str(go)),
            "stream_output": False})
        quick = api.create_deployment(pool, job_variables={
            "command": spew_command("--mb", "0"), "stream_output": False})
        env = worker_env(prefect_server, tmp_path, state,
                         FLOWHAND_STATE_DIR_MIN_FREE_BYTES=str(MB),
                         FLOWHAND_HTTP__ENABLED="true", FLOWHAND_HTTP__PORT=str(port))
        worker = Running("start", "--pool", pool, "--name", "full-worker", env=env,
                         stdout=subprocess.DEVNULL)
        try:
            first = api.create_run(chatty)
            wait_for(started.exists, 60, "the chatty run to start", interval=0.05)
            time.sleep(0.5)  # its infrastructure id is journaled right after the start
            filler = fill(state)
            assert os.statvfs(state).f_bavail == 0
            go.touch()
            assert api.wait_final(first, 120)["type"] == "COMPLETED"
            second = api.create_run(quick)
            worker.wait_for("state_dir.low_space", 30)
            time.sleep(1.5)  # several polls while full
            readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert readyz.status_code == 503 and "state_dir_min_free_bytes" in readyz.text
            assert api.state(second)["type"] == "SCHEDULED"
            filler.unlink()
            assert api.wait_final(second, 60)["type"] == "COMPLETED"
            worker.wait_for("state_dir.space_recovered", 10)
        finally:
            code = worker.stop()
    assert code == 0, worker.stderr[-3000:]
    assert worker.stderr.count("state_dir.low_space") == 1, worker.stderr[-3000:]


def test_kill_9_with_a_chatty_run_in_flight_then_a_restart_reads_on(
    api: API, prefect_server: PrefectServer, tmp_path: Path,
) -> None:
    """kill -9 of the worker while a run prints 150 MB: the run is not killed by a broken pipe,
    it waits on its full pipe (its progress stops) and nothing grows on disk; the restarted
    worker re-attaches, reads on, the run prints the rest and COMPLETES; its pipe is removed."""
    marks = tmp_path / "progress"
    with tmpfs(tmp_path / "state", "64m") as state:
        pool = api.create_pool()
        dep = api.create_deployment(pool, job_variables={
            "command": spew_command("--mb", "150", "--progress", str(marks))})
        run = api.create_run(dep)
        env = worker_env(prefect_server, tmp_path, state)
        before = used_bytes(state)
        with usage_sampler(state) as usage:
            first = Running("start", "--pool", pool, "--name", "chatty-worker", env=env,
                            stdout=subprocess.DEVNULL)
            try:
                wait_for(lambda: progress(marks) >= 10, 120, "10 MB printed", interval=0.05)
            finally:
                os.killpg(first.proc.pid, signal.SIGKILL)
                first.stop()
            pid = int(str(api.flow_run(run)["infrastructure_pid"]).rpartition(":")[2])
            time.sleep(1.5)
            stalled = progress(marks)
            time.sleep(1.5)
            assert progress(marks) == stalled < 150, "the run must wait for a reader"
            os.kill(pid, 0)  # alive: no SIGPIPE, no EPIPE
            fifo = state / "chatty-worker" / "runs" / f"{run}.fifo"
            info = fifo.stat()
            assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            second = Running("start", "--pool", pool, "--name", "chatty-worker", env=env,
                             stdout=subprocess.DEVNULL)
            try:
                assert api.wait_final(run, 180)["type"] == "COMPLETED"
                assert progress(marks) == 150
            finally:
                code = second.stop()
        assert code == 0, second.stderr[-3000:]
        assert usage["peak"] - before < MB // 2, usage
        assert not fifo.exists()
    reattached = [e for e in json_lines(second.stderr) if e["event"] == "flow_run.reattached"]
    assert [e["flow_run_id"] for e in reattached] == [run]


def test_state_dir_is_private_whatever_the_umask_and_stale_files_go(
    api: API, prefect_server: PrefectServer, tmp_path: Path,
) -> None:
    """A state_dir left 0755 with 0644 files and stale output of an older flowhand, a worker
    started with umask 000: one line says it was tightened, stale files are removed at
    start-up, and while a run is in flight every directory is 0700 and every file (journal,
    lock, output pipe) 0600."""
    state = tmp_path / "state"
    runs_dir = state / "mode-worker" / "runs"
    runs_dir.mkdir(parents=True)
    stale_log, stale_fifo = runs_dir / f"{uuid.uuid4()}.log", runs_dir / f"{uuid.uuid4()}.fifo"
    stale_log.write_text("old output\n")
    os.mkfifo(stale_fifo)
    for path in (state, state / "mode-worker", runs_dir):
        os.chmod(path, 0o755)
    for path in (stale_log, stale_fifo):
        os.chmod(path, 0o644)
    started, go = tmp_path / "started", tmp_path / "go"
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "command": spew_command("--mb", "1", "--started", str(started), "--go", str(go)),
        "stream_output": False})
    run = api.create_run(dep)
    worker = Running("start", "--pool", pool, "--name", "mode-worker",
                     env=worker_env(prefect_server, tmp_path, state), umask=0)
    try:
        wait_for(started.exists, 60, "the run to start", interval=0.05)
        time.sleep(0.5)
        found = {}
        for top, dirs, files in os.walk(state):
            for name in [".", *dirs, *files]:
                path = Path(top) / name
                found[str(path.relative_to(state))] = path.lstat().st_mode
        go.touch()
        assert api.wait_final(run, 60)["type"] == "COMPLETED"
    finally:
        code = worker.stop()
    assert code == 0, worker.stderr[-3000:]
    kinds = {k: (stat.S_IFMT(m), stat.S_IMODE(m)) for k, m in found.items()}
    assert f"mode-worker/runs/{run}.fifo" in kinds and f"mode-worker/claims/{run}.json" in kinds
    assert "mode-worker/lock" in kinds
    wrong = {k: oct(mode) for k, (kind, mode) in kinds.items()
             if mode != (0o700 if kind == stat.S_IFDIR else 0o600)}
    assert wrong == {}, wrong
    assert not stale_log.exists() and not stale_fifo.exists()
    assert worker.stderr.count("state_dir.tightened") == 1, worker.stderr[-3000:]
    assert list(runs_dir.iterdir()) == []


@pytest.mark.parametrize("run_once", [False, True], ids=["service", "run-once"])
def test_an_unusable_state_dir_stops_start_up_in_one_line(
    prefect_server: PrefectServer, tmp_path: Path, run_once: bool,
) -> None:
    """A read-only tmpfs (as state_dir, or holding a state_dir that does not exist yet) and an
    immutable directory: `flowhand start`, as a service or --run-once, exits 2 with one line
    naming the path and the reason, before any run could be claimed."""
    mode = ["--run-once"] if run_once else []
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro, \
            tmpfs(tmp_path / "rw", "1m") as rw:
        locked = rw / "locked"
        locked.mkdir(mode=0o700)
        subprocess.run(["chattr", "+i", str(locked)], check=True)
        try:
            cases = [(ro, "Read-only file system"), (ro / "missing", "Read-only file system"),
                     (locked, "Operation not permitted")]
            for state, reason in cases:
                result = console.run(
                    "start", "--pool", "never-polled", *mode,
                    env=worker_env(prefect_server, tmp_path, state), timeout=60)
                line = assert_one_line_error(result, f"state_dir {state} cannot be used",
                                             reason)
                assert "FLOWHAND_STATE_DIR" in line
        finally:
            subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_a_read_only_state_dir_with_a_private_tree_is_found_by_the_write_probe(
    prefect_server: PrefectServer, tmp_path: Path,
) -> None:
    """A private tree made earlier on a tmpfs since remounted read-only: every mode is right,
    so only the write probe can tell; exit 2, one line naming the worker's directory."""
    with tmpfs(tmp_path / "state", "1m") as state:
        made = subprocess.run(
            [sys.executable, "-c", "import sys; from flowhand.state_dir import WorkerStateDir;"
             " WorkerStateDir(sys.argv[1], 'ro-worker').check()", str(state)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
            capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        remount_read_only(state)
        result = console.run("start", "--pool", "never-polled", "--name", "ro-worker",
                             "--run-once", env=worker_env(prefect_server, tmp_path, state))
    assert_one_line_error(result, f"state_dir {state} cannot be used", "Read-only file system",
                          "ro-worker")
