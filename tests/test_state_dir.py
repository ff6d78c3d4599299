"""state_dir: private whatever was there before, refused in one line when it cannot be written,
and watched for free space before every claim (in-memory API, FakeBackend, real filesystems)."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import anyio
import pytest
import structlog

from flowhand.backends.fake import FakeBackend
from flowhand.errors import ConfigError
from flowhand.state_dir import WorkerStateDir
from flowhand.worker import Worker
from flowhand.worker.health import Health
from flowhand.worker.space import SpaceGuard
from tests.fake_api import FakeAPI
from tests.fake_worker import completes, run_worker, until
from tests.tmpfs import fill, remount_read_only, tmpfs

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_a_loose_state_dir_is_tightened_with_one_line(tmp_path: Path) -> None:
    """A state_dir an older flowhand left 0755 with 0644 journal, output file and FIFO: after
    start-up every directory is 0700 and every file 0600, said in one warning line."""
    root = tmp_path / "state"
    worker = root / "w"
    (worker / "claims").mkdir(parents=True)
    (worker / "runs").mkdir()
    for path in (root, worker, worker / "claims", worker / "runs"):
        os.chmod(path, 0o755)
    for path in (worker / "claims" / f"{uuid.uuid4()}.json", worker / "runs" / "old.log",
                 worker / "lock"):
        path.write_text("{}")
        os.chmod(path, 0o644)
    os.mkfifo(worker / "runs" / "old.fifo", 0o666)
    os.chmod(worker / "runs" / "old.fifo", 0o666)
    state = WorkerStateDir(root, "w")
    with structlog.testing.capture_logs() as logs:
        state.acquire()
    state.release()
    found = modes(root)
    assert {k: v for k, v in found.items() if v not in (0o700, 0o600)} == {}
    assert all(v == 0o700 for k, v in found.items()
               if k in (".", "w", "w/claims", "w/runs")), found
    assert len(found) == 8, found
    lines = [e for e in logs if e["event"] == "state_dir.tightened"]
    assert len(lines) == 1 and lines[0]["changed"] == 8, logs
    with structlog.testing.capture_logs() as logs:
        state.acquire()
    state.release()
    assert not [e for e in logs if e["event"] == "state_dir.tightened"], "once only"


def test_a_shared_sticky_state_dir_is_left_as_it_is(tmp_path: Path) -> None:
    """state_dir = a shared sticky directory (like /tmp): its modes are left alone (others rely
    on them), the worker's own directory inside is 0700 all the same."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    state = WorkerStateDir(shared, "w")
    with structlog.testing.capture_logs() as logs:
        state.acquire()
    state.release()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert not [e for e in logs if e["event"] == "state_dir.tightened"]


@pytest.mark.parametrize("layout", ["mount point", "missing below it", "made before"])
def test_a_read_only_state_dir_stops_the_worker_in_one_line(tmp_path: Path, layout: str) -> None:
    """On a read-only tmpfs (the mount point itself, a directory that cannot be made there, or
    a private tree made before the remount) Worker.run refuses at once with one line naming
    the path and the reason; nothing is claimed."""
    mount = tmp_path / "ro"
    with tmpfs(mount, size="1m"):
        state = {"mount point": mount, "missing below it": mount / "a" / "b",
                 "made before": mount / "state"}[layout]
        if layout == "made before":
            WorkerStateDir(state, "unit-worker").check()
        remount_read_only(mount)
        api = FakeAPI()
        run = api.add_run()
        with pytest.raises(ConfigError) as caught:
            run_worker(api, FakeBackend(handler=completes(api)), tmp_path, state_dir=str(state))
    message = str(caught.value)
    assert "\n" not in message
    assert f"state_dir {state} cannot be used" in message
    assert "Read-only file system" in message
    assert api.types(run) == ["SCHEDULED"]


def test_claiming_pauses_while_state_dir_is_full_and_resumes(tmp_path: Path) -> None:
    """A full 1 MiB tmpfs as state_dir: no claim, /readyz says why, one warning however many
    polls; once the space is back the run is claimed and completes."""
    mount = tmp_path / "small"
    with tmpfs(mount, size="1m"):
        state = mount / "state"
        WorkerStateDir(state, "unit-worker").check()
        filler = fill(mount)
        api = FakeAPI()
        run = api.add_run()
        seen: dict[str, object] = {}

        async def body(worker: Worker) -> None:
            await until(lambda: worker.space.reason is not None)
            await anyio.sleep(0.3)  # several polls
            seen["ready"] = worker.health.readiness()
            seen["types"] = api.types(run)
            filler.unlink()
            await until(lambda: api.types(run)[-1] == "COMPLETED")

        with structlog.testing.capture_logs() as logs:
            worker = run_worker(api, FakeBackend(handler=completes(api)), tmp_path, body,
                                state_dir=str(state), state_dir_min_free_bytes=64 << 10)
    ready, reason = seen["ready"]  # type: ignore[misc]
    assert not ready and "state_dir_min_free_bytes (65536)" in reason and str(state) in reason
    assert seen["types"] == ["SCHEDULED"]
    assert len([e for e in logs if e["event"] == "state_dir.low_space"]) == 1
    assert len([e for e in logs if e["event"] == "state_dir.space_recovered"]) == 1
    assert worker.health.paused_reason is None


def test_the_free_space_check_says_why_and_can_be_turned_off(tmp_path: Path) -> None:
    """More than the disk can have is refused with the figures; an unreadable state_dir is
    refused too; 0 turns the check off whatever the filesystem says."""
    health = Health(1.0, 1.0, anyio.Event())
    log = structlog.get_logger("test")
    greedy = SpaceGuard(tmp_path, 1 << 62, health, log)
    assert not greedy.room_to_claim()
    assert greedy.reason is not None and f"below state_dir_min_free_bytes ({1 << 62})" in \
        greedy.reason and health.readiness() == (False, greedy.reason)
    missing = SpaceGuard(tmp_path / "gone", 1, health, log)
    assert not missing.room_to_claim() and "cannot be read" in str(missing.reason)
    assert SpaceGuard(tmp_path / "gone", 0, Health(1.0, 1.0, anyio.Event()), log).room_to_claim()
