"""What /proc tells about a process: enough to know a PID still means the process we started.

A PID alone is not an identity (the kernel reuses them): the start time in clock ticks since boot
is, together with the PID; a run's id in its environment proves the process is that run's.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path


def start_ticks(pid: int) -> str | None:
    """Start time in clock ticks since boot: with the pid, an identity a reused PID lacks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def runs_flow_run(pid: int, flow_run_id: uuid.UUID) -> bool:
    """Whether the process carries this flow run's id in its environment (as every run does)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.split(b"\0")


#: The name `tempfile.mkdtemp(prefix="flowhand-")` gives a run's temporary working directory.
_RUN_TEMP_DIR = re.compile(r"flowhand-[a-z0-9_]{8}")


def run_temp_dir(pid: int) -> str | None:
    """The temporary working directory a worker made for the run in `pid` (its working
    directory, or the ancestor of it directly in the temp directory), so that a worker that
    re-attaches to the run removes it at the end as the one that started it would have."""
    where = cwd(pid)
    if where is None:
        return None
    root = Path(tempfile.gettempdir()).resolve()
    path = Path(where)
    for candidate in (path, *path.parents):
        if candidate.parent == root:
            return str(candidate) if _RUN_TEMP_DIR.fullmatch(candidate.name) else None
    return None


def cwd(pid: int) -> str | None:
    """The process's working directory, or None when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
