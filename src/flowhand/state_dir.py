"""The worker's private corner of `state_dir`: its own directory, locked while it runs.

Several workers may share one `state_dir` (three services on one host get the same default):
each keeps its journal and run files under `<state_dir>/<worker name>/`, so no worker ever
reads, overwrites or deletes another's entries. A lock held for the worker's lifetime makes a
second worker with the same name and `state_dir` refuse to start instead of sharing a journal.
Everything is private to the user flowhand runs as (directories 0700, files 0600), whatever the
umask, because run output can hold what flows print (tokens, customer data): a looser tree is
tightened at start-up, in one line. The same check proves the directory writable, so a
read-only or unwritable `state_dir` stops start-up in one line instead of failing the first run.
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


def make_private_dir(path: Path) -> bool:
    """Create `path` (and parents) 0700 whatever the umask; tighten it, with one line, if it is
    looser (or lacks the owner's bits). True when it was changed."""
    old = _quiet_private_dir(path)
    if old is not None:
        log.warning("state_dir.tightened", path=str(path), was=old, now=oct(DIR_MODE))
    return old is not None


def _quiet_private_dir(path: Path) -> str | None:
    """Like `make_private_dir` without the line: the old mode when it was changed."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode == DIR_MODE:
        return None
    os.chmod(path, DIR_MODE)
    return oct(mode)


def tighten_tree(path: Path) -> list[str]:
    """Make every directory below `path` 0700 and everything else 0600 (symbolic links are not
    followed); the paths changed, as `path (0o755)`. A state_dir made by an older flowhand, or
    copied with a loose umask, becomes private in one pass."""
    changed = []
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(top) / name
            try:
                info = entry.lstat()
            except FileNotFoundError:
                continue  # a run's files come and go
            if stat.S_ISLNK(info.st_mode):
                continue
            want = DIR_MODE if stat.S_ISDIR(info.st_mode) else FILE_MODE
            mode = stat.S_IMODE(info.st_mode)
            if mode != want:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(entry, want)
                    changed.append(f"{entry} ({oct(mode)})")
    return changed


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

    def check(self) -> None:
        """Create the directories private, tighten what is looser (one line when anything was),
        and prove the worker's directory writable; ConfigError (one line naming the path and
        the reason) when state_dir cannot be used: read-only, not writable, not creatable."""
        try:
            own = [self.path, self.claims_dir, self.runs_dir]
            changed = [f"{d} ({old})" for d in ([self.root] if _ours(self.root) else []) + own
                       if (old := _quiet_private_dir(d)) is not None]
            changed += tighten_tree(self.path)
            self._probe()
        except OSError as exc:
            where = exc.filename or self.root
            raise ConfigError(
                f"state_dir {self.root} cannot be used: {where}: {exc.strerror or exc}; make it "
                "writable by this user, or set state_dir (FLOWHAND_STATE_DIR) to a writable "
                "directory") from None
        if changed:
            log.warning("state_dir.tightened", path=str(self.root), mode="directories 0700, "
                        "files 0600", changed=len(changed), paths=changed[:20])

    def _probe(self) -> None:
        """Create and remove a file: a read-only mount or a directory this user cannot write
        fails here, at start-up, not when the first run arrives."""
        probe = self.path / f".probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        os.close(fd)
        os.unlink(probe)

    def acquire(self) -> None:
        """Check (see `check`) and lock the directory; ConfigError (one line) when it cannot be
        used or another worker of the same name holds it."""
        self.check()
        try:
            fd = open_private(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"state_dir {self.root} cannot be used: {self.path / 'lock'}: "
                f"{exc.strerror or exc}; set state_dir (FLOWHAND_STATE_DIR) to a writable "
                "directory") from None
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
        # The pid is for the message above; a full filesystem must not stop the start for it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _ours(root: Path) -> bool:
    """Whether state_dir itself may be made private: not a shared directory (sticky, like /tmp,
    or another user's), whose modes others rely on; the worker's own directory inside it is
    private either way."""
    try:
        info = root.stat()
    except FileNotFoundError:
        return True
    return info.st_uid == os.geteuid() and not info.st_mode & stat.S_ISVTX


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
