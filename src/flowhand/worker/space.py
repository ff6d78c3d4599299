"""Free space in state_dir, checked before every claim: a worker that cannot write its journal
must not claim runs it could not serve.

Run output never needs the space (it goes through pipes); the journal and the files of each run
do. Below `state_dir_min_free_bytes` (or with almost no inodes left) the worker stops claiming,
says so once (`state_dir.low_space`), answers /readyz with the reason, and claims again once
space is back (`state_dir.space_recovered`). Runs in flight are not touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from flowhand.worker.health import Health

#: Fewer free inodes than this is as bad as no space: a claim creates a journal file.
MIN_FREE_INODES = 64


@dataclass(frozen=True)
class FreeSpace:
    bytes: int
    #: None when the filesystem does not count inodes (btrfs and others report 0 of 0).
    inodes: int | None


def free_space(path: Path) -> FreeSpace:
    """What an unprivileged user may still use on `path`'s filesystem."""
    info = os.statvfs(path)
    inodes = info.f_favail if info.f_files else None
    return FreeSpace(bytes=info.f_bavail * info.f_frsize, inodes=inodes)


class SpaceGuard:
    """Says whether there is room to claim a run; keeps `Health.paused_reason` up to date."""

    def __init__(self, path: Path, min_free_bytes: int, health: Health,
                 log: FilteringBoundLogger) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.health = health
        self.log = log
        #: Why claiming is paused, while it is.
        self.reason: str | None = None

    def room_to_claim(self) -> bool:
        problem = self._problem()
        if problem is None:
            if self.reason is not None:
                self.log.info("state_dir.space_recovered", path=str(self.path))
                self.reason = self.health.paused_reason = None
            return True
        if self.reason is None:
            self.log.warning("state_dir.low_space", path=str(self.path), reason=problem,
                             action="not claiming runs until there is room again")
        self.reason = self.health.paused_reason = problem
        return False

    def _problem(self) -> str | None:
        if self.min_free_bytes <= 0:
            return None
        try:
            free = free_space(self.path)
        except OSError as exc:
            return f"state_dir {self.path} cannot be read: {exc.strerror or exc}"
        if free.bytes < self.min_free_bytes:
            return (f"state_dir {self.path} has {free.bytes} bytes free, below "
                    f"state_dir_min_free_bytes ({self.min_free_bytes}): not claiming runs")
        if free.inodes is not None and free.inodes < MIN_FREE_INODES:
            return (f"state_dir {self.path} has {free.inodes} inodes free: not claiming runs")
        return None
