"""The worker's private corner of `state_dir`: its own directory, locked while it runs.

Several workers may share one `state_dir` (three services on one host get the same default):
each keeps its journal and run files under `<state_dir>/<worker name>/`, so no worker ever
reads, overwrites or deletes another's entries. A lock held for the worker's lifetime makes a
second worker with the same name and `state_dir` refuse to start instead of sharing a journal.
Everything is private to the user flowhand runs as (directories 0700, files 0600), whatever the
umask, because run output can hold what flows print (tokens, customer data).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
from pathlib import Path

import structlog

from flowhand.errors import ConfigError

log = structlog.get_logger("flowhand.state_dir")

DIR_MODE = 0o700
FILE_MODE = 0o600


def worker_dir_name(worker_name: str) -> str:
    """A file name for a worker name: itself when safe, else a readable slug plus a hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", worker_name).strip(".") or "worker"
    if slug == worker_name and len(slug) <= 100:
        return slug
    digest = hashlib.sha256(worker_name.encode()).hexdigest()[:8]
    return f"{slug[:90]}-{digest}"


def worker_dir(state_dir: Path, worker_name: str) -> Path:
    return Path(state_dir) / worker_dir_name(worker_name)


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) 0700; tighten it, with one line, if it is looser."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, DIR_MODE)
        log.warning("state_dir.tightened", path=str(path), was=oct(mode), now=oct(DIR_MODE))


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600 whatever the umask (an existing file is tightened too)."""
    fd = os.open(path, flags, FILE_MODE)
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    return fd


class WorkerStateDir:
    """`<state_dir>/<worker>/`, created private and locked by this process until `release`."""

    def __init__(self, state_dir: Path, worker_name: str) -> None:
        self.root = Path(state_dir)
        self.worker_name = worker_name
        self.path = worker_dir(self.root, worker_name)
        self._lock_fd: int | None = None

    @property
    def claims_dir(self) -> Path:
        return self.path / "claims"

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    def acquire(self) -> None:
        """Create, check and lock the directory; ConfigError (one line) when it cannot be used."""
        try:
            make_private_dir(self.root)
            make_private_dir(self.path)
            fd = open_private(self.path / "lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise ConfigError(
                f"state_dir {self.root} cannot be used: {exc.strerror or exc}; set state_dir "
                "(FLOWHAND_STATE_DIR) to a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {self.path / 'lock'}: {exc.strerror}") from None
            raise ConfigError(
                f"another flowhand worker named {self.worker_name!r} is running with state_dir "
                f"{self.root} (process {holder or 'unknown'} holds {self.path / 'lock'}); give "
                "this one another --name or state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
