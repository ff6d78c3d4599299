"""A run's output through a pipe the run holds itself: the process backend's output channel.

The run's stdout and stderr are a FIFO, `<state_dir>/<worker>/runs/<flow run id>.fifo` (0600 in
a 0700 directory), opened by the run for reading *and* writing:

* Nothing the run prints is written to disk: the kernel holds at most one pipe buffer of it
  (`[subprocess] output_buffer_bytes`, 1 MiB), so run output can neither fill state_dir's
  filesystem nor fail the run's writes with ENOSPC, however full that filesystem is.
* The run is a reader of its own pipe, so it never gets SIGPIPE or EPIPE when flowhand goes
  away: a worker killed or restarted leaves it running. Once the buffer is full the run's writes
  wait until a worker (the restarted one, re-opening the FIFO by name) reads again; nothing is
  lost meanwhile.
* flowhand reads when the pipe is readable, so a quiet run costs nothing, and copies what it
  needs: its own stdout, the run's logs, the last lines in memory for a crash message.

When the FIFO cannot be made (no inode left, say), the run gets an anonymous pipe instead, which
a restarted worker finds again through `/proc/<pid>/fd/1`. Runs started by flowhand versions
that wrote `<flow run id>.log` files are still read from those files (`output_file`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.output import OutputSource
from flowhand.backends.process.output_file import OutputFile
from flowhand.state_dir import FILE_MODE

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.process.output_pipe")

FIFO_SUFFIX = ".fifo"
LEGACY_SUFFIX = ".log"
#: Most bytes taken from one pipe in one read (a pipe holds at most its size, 1 MiB unless
#: root asked for more).
MAX_READ = 4 << 20
#: A line longer than this is passed on in pieces rather than held whole in memory.
MAX_LINE = 64 << 10
#: Where the kernel says how large an unprivileged pipe may be made.
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


class OutputPipe:
    """Reads a run's pipe without blocking; an `OutputSource` the pump must keep reading."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        #: Every writer is gone (the run and whatever inherited its stdout ended).
        self.eof = False
        self._partial = b""

    async def read(self, final: bool) -> bytes:
        """What the run wrote since the last read, in whole lines until the end."""
        data = self._read_once()
        while final and not self.eof:
            # The run has ended: take all that is left, however large its pipe was made.
            more = self._read_once()
            if not more:
                break
            data += more
        if self._partial:
            data, self._partial = self._partial + data, b""
        if final or self.eof:
            return data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > MAX_LINE:
            cut = len(data)
        if cut == len(data):
            return data
        self._partial = data[cut:]
        return data[:cut]

    def _read_once(self) -> bytes:
        """One read: what the pipe holds (at most its size), without copying to gather more."""
        if self.fd is None:
            return b""
        try:
            data = os.read(self.fd, MAX_READ)
        except BlockingIOError:
            return b""
        except OSError:
            self.eof = True
            return b""
        self.eof = not data
        return data

    async def wait(self, seconds: float) -> None:
        """Return once the pipe is readable (new output, or the end), or after `seconds`."""
        if self.fd is None or self.eof:
            await anyio.sleep(seconds)
            return
        with anyio.move_on_after(seconds):
            await anyio.wait_readable(self.fd)

    async def last_lines(self, count: int) -> list[str]:
        # Nothing is kept outside memory: the pump holds the last lines of what it read.
        return []

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class RunOutput:
    """One run's output channel: what the pump reads, and the name to remove at the end."""

    source: OutputSource
    #: The FIFO (or an older flowhand's output file); None for an anonymous pipe.
    path: Path | None = None
    #: The descriptor the run's stdout and stderr are made of, until it is started.
    writer: int | None = field(default=None, repr=False)

    def close_writer(self) -> None:
        """Once the run holds the pipe, flowhand keeps no writer (or it would never see EOF)."""
        if self.writer is not None:
            os.close(self.writer)
            self.writer = None

    def close(self) -> None:
        """Stop reading; the run and its FIFO live on (a worker that detaches calls this)."""
        self.close_writer()
        if isinstance(self.source, OutputPipe):
            self.source.close()

    def remove(self) -> None:
        """The run has ended: close and remove its FIFO."""
        self.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def fifo_path(runs_dir: Path, flow_run_id: uuid.UUID) -> Path:
    return runs_dir / f"{flow_run_id}{FIFO_SUFFIX}"


def open_run_output(runs_dir: Path, flow_run_id: uuid.UUID, buffer_bytes: int) -> RunOutput:
    """A new run's channel; its `writer` becomes the run's stdout and stderr."""
    path: Path | None = fifo_path(runs_dir, flow_run_id)
    assert path is not None
    try:
        writer, reader = _make_fifo(path)
    except OSError as exc:
        # The run must not fail for want of an inode: an anonymous pipe serves as well, only
        # without a name (a restarted worker finds it through /proc).
        log.warning("output.anonymous_pipe", flow_run_id=str(flow_run_id), path=str(path),
                    reason=exc.strerror or str(exc))
        writer, reader = _anonymous_pipe()
        path = None
    _set_pipe_size(writer, buffer_bytes)
    return RunOutput(source=OutputPipe(reader), path=path, writer=writer)


def _make_fifo(path: Path) -> tuple[int, int]:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an earlier attempt of the same run
    os.mkfifo(path, FILE_MODE)
    writer = None
    try:
        os.chmod(path, FILE_MODE)  # whatever the umask took away or left
        # Read-write: the run is a reader of its own pipe (no SIGPIPE, ever), and the open
        # does not wait for the other end.
        writer = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        if writer is not None:
            os.close(writer)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return writer, reader


def _anonymous_pipe() -> tuple[int, int]:
    reader, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # A read-write descriptor of the same pipe, blocking, for the run (see _make_fifo).
        writer = os.open(f"/proc/self/fd/{write_end}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        os.close(write_end)
    return writer, reader


def _set_pipe_size(fd: int, size: int) -> int:
    """Ask for a pipe of `size` bytes, else the largest an unprivileged user may have; the
    kernel's default (64 KiB) when neither is granted (a user's pipes over the kernel's soft
    limit). The size it got."""
    wanted = [size]
    with contextlib.suppress(OSError, ValueError):
        wanted.append(min(size, int(PIPE_MAX_SIZE.read_text())))
    for attempt in wanted:
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, attempt)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EBUSY, errno.EINVAL):
                raise
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def reopen_run_output(runs_dir: Path, flow_run_id: uuid.UUID, pid: int) -> RunOutput | None:
    """The channel of a run started by an earlier worker process: its FIFO by name, else an
    older flowhand's output file, else its stdout through /proc when that is a pipe."""
    path = fifo_path(runs_dir, flow_run_id)
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(path.lstat().st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            return RunOutput(source=OutputPipe(fd), path=path)
    legacy = runs_dir / f"{flow_run_id}{LEGACY_SUFFIX}"
    if legacy.exists():
        return RunOutput(source=OutputFile(legacy), path=legacy)
    stdout = f"/proc/{pid}/fd/1"
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.stat(stdout).st_mode):
            fd = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            return RunOutput(source=OutputPipe(fd))
    return None


def clean_runs_dir(runs_dir: Path) -> list[str]:
    """Remove what no run holds any more (FIFOs and output files of runs that ended while no
    worker watched); the names removed. Run at start-up, before any run is re-attached."""
    try:
        entries = list(runs_dir.iterdir())
    except OSError:
        return []
    removed = []
    legacy = []
    for entry in entries:
        if entry.name.endswith(FIFO_SUFFIX):
            if not _fifo_held(entry):
                removed.append(entry)
        elif entry.name.endswith(LEGACY_SUFFIX):
            legacy.append(entry)
        elif entry.name.endswith(".tmp"):
            removed.append(entry)
    if legacy:
        held = _open_files()
        removed += [p for p in legacy if _identity(p) not in held]
    for entry in removed:
        with contextlib.suppress(OSError):
            entry.unlink()
    return [entry.name for entry in removed]


def _fifo_held(path: Path) -> bool:
    """Whether a run still holds this FIFO: opening it for writing without blocking succeeds
    only when some process has it open for reading (a run holds it read-write)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno != errno.ENXIO and exc.errno != errno.ENOENT
    os.close(fd)
    return True


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _open_files() -> set[tuple[int, int] | None]:
    """(device, inode) of every file some process of this user has open: one pass over /proc,
    made only when older output files are found."""
    held: set[tuple[int, int] | None] = set()
    with contextlib.suppress(OSError):
        for proc in os.scandir("/proc"):
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{proc.name}/fd"):
                    with contextlib.suppress(OSError):
                        info = os.stat(fd.path)
                        held.add((info.st_dev, info.st_ino))
    return held
