"""Identity records of forked runs, so that a restarted worker can re-attach them.

A run forked by a warm helper carries the helper's environment in /proc/<pid>/environ (a fork
does not change it), so the run's id there cannot prove a PID is the run's. The record written
when the run starts can: the PID, its start time in clock ticks since boot (from
/proc/<pid>/stat, which a reused PID does not share) and the flow run id, in a file only
flowhand's user can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from flowhand.backends.process.procfs import start_ticks


def _path(state_dir: Path, flow_run_id: uuid.UUID) -> Path:
    return state_dir / "warm" / "runs" / f"{flow_run_id}.json"


def write(state_dir: Path, flow_run_id: uuid.UUID, pid: int, start_ticks: str | None) -> None:
    path = _path(state_dir, flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"pid": pid, "start_ticks": start_ticks, "flow_run_id": str(flow_run_id)}
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(temp, path)


def matches(state_dir: Path, flow_run_id: uuid.UUID, pid: int) -> bool:
    """Whether `pid` is the process forked for this run (and still the same process)."""
    try:
        record = json.loads(_path(state_dir, flow_run_id).read_text())
    except (OSError, ValueError):
        return False
    ticks = start_ticks(pid)
    return (isinstance(record, dict) and record.get("pid") == pid and ticks is not None
            and record.get("start_ticks") == ticks
            and record.get("flow_run_id") == str(flow_run_id))


def remove(state_dir: Path, flow_run_id: uuid.UUID) -> None:
    with contextlib.suppress(OSError):
        _path(state_dir, flow_run_id).unlink()
