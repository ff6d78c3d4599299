"""Fast checks of the rules the fleet relies on: which final state a re-opening claim replaced,
which claims have lapsed, which workers are alive, and the private, locked state directory."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flowhand.api.models import FlowRun, PoolWorker, State, StateType
from flowhand.errors import ConfigError
from flowhand.journal import Journal
from flowhand.state_dir import WorkerStateDir, worker_dir_name
from flowhand.worker.history import replaced_final_state
from flowhand.worker.takeover import lapsed_claims, online_workers

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def state(kind: StateType, seconds: float, name: str | None = None) -> State:
    return State(type=kind, name=name, timestamp=T0 + timedelta(seconds=seconds))


def test_replaced_final_state_is_the_first_final_after_the_last_scheduled() -> None:
    """A COMPLETED run re-opened by a late claim, then reported CRASHED by the worker that saw
    its process exit with the run PENDING: the true end is COMPLETED, not the later CRASHED."""
    history = [
        state(StateType.SCHEDULED, 0), state(StateType.PENDING, 1), state(StateType.RUNNING, 2),
        state(StateType.COMPLETED, 5), state(StateType.PENDING, 6),
        state(StateType.CRASHED, 7),
    ]
    found = replaced_final_state(history)
    assert found is not None and found.type is StateType.COMPLETED


def test_a_retry_makes_earlier_final_states_history() -> None:
    """A run that crashed, was retried (SCHEDULED) and is now PENDING has not finished."""
    history = [
        state(StateType.SCHEDULED, 0), state(StateType.PENDING, 1), state(StateType.CRASHED, 2),
        state(StateType.SCHEDULED, 3, "AwaitingRetry"), state(StateType.PENDING, 4),
    ]
    assert replaced_final_state(history) is None
    assert replaced_final_state([state(StateType.PENDING, 1)]) is None


def flow_run(kind: StateType, age: float, now: datetime, pid: str | None = None) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4(), infrastructure_pid=pid,
                   state=State(type=kind, timestamp=now - timedelta(seconds=age)))


def test_only_pending_claims_older_than_the_lease_have_lapsed() -> None:
    """Young PENDING claims and runs in other states are never candidates."""
    now = T0
    old, young = flow_run(StateType.PENDING, 200, now), flow_run(StateType.PENDING, 10, now)
    running = flow_run(StateType.RUNNING, 500, now)
    assert lapsed_claims([old, young, running], timedelta(seconds=120), now) == [old]


def test_online_workers_need_status_and_a_recent_heartbeat() -> None:
    """ONLINE with a heartbeat within three intervals is alive; an ONLINE flag the foreman has
    not updated yet does not keep a silent worker alive."""
    now = T0
    workers = [
        PoolWorker(name="a", status="ONLINE", last_heartbeat_time=now - timedelta(seconds=20),
                   heartbeat_interval_seconds=10),
        PoolWorker(name="b", status="ONLINE", last_heartbeat_time=now - timedelta(seconds=40),
                   heartbeat_interval_seconds=10),
        PoolWorker(name="c", status="OFFLINE", last_heartbeat_time=now,
                   heartbeat_interval_seconds=10),
    ]
    assert online_workers(workers, now) == {"a"}


def test_worker_state_dirs_are_private_and_locked(tmp_path: Path) -> None:
    """Each worker gets <state_dir>/<name> (0700 under a 0700 root, files 0600 whatever the
    umask); a second holder of the same name is refused with the holder's pid."""
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    old_umask = os.umask(0)
    try:
        first = WorkerStateDir(root, "worker/a b")
        first.acquire()
        Journal(first.claims_dir).claiming(uuid.uuid4(), uuid.uuid4())
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE(first.path.stat().st_mode) == 0o700
        assert first.path.name == worker_dir_name("worker/a b") != "worker/a b"
        for path in [*first.claims_dir.iterdir(), first.path / "lock"]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        with pytest.raises(ConfigError, match=f"process {os.getpid()} holds"):
            WorkerStateDir(root, "worker/a b").acquire()
        other = WorkerStateDir(root, "worker-b")
        other.acquire()
        other.release()
    finally:
        first.release()
    again = WorkerStateDir(root, "worker/a b")
    again.acquire()
    again.release()


def test_an_unusable_state_dir_is_one_clear_error(tmp_path: Path) -> None:
    """A state_dir that cannot be created names the path and the reason."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be used"):
        WorkerStateDir(blocker / "state", "w").acquire()
