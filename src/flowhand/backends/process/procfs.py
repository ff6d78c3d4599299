"""What /proc tells about a process: enough to know a PID still means the process we started.

A PID alone is not an identity (the kernel reuses them): the start time in clock ticks since boot
is, together with the PID; a run's id in its environment proves the process is that run's.
"""

from __future__ import annotations

import os
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


def cwd(pid: int) -> str | None:
    """The process's working directory, or None when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
