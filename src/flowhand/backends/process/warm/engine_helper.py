"""A warm Prefect engine: imports Prefect's engine once, then forks one child per flow run.

Run BY PATH with the interpreter of the Prefect installation that cold starts would use
(`<python> engine_helper.py <socket> <idle seconds>`): it uses only the standard library and
the Prefect installed there, never flowhand. It prints `ready` on stdout once it listens.

Protocol, one connection per run on a private Unix socket (mode 0600): the client sends one
JSON line `{"env": {...}, "cwd": "..."}` carrying one file descriptor (SCM_RIGHTS), the run's
output destination; the helper answers `{"pid": N}` as soon as the child exists (or
`{"error": "..."}`), then `{"exit": code}` when the child ends (negative: killed by that signal,
as subprocess reports it).

The child starts its own session, changes to the run's directory, takes the run's exact
environment and a clean sys.argv, writes to the given descriptor, rebuilds Prefect's settings and
logging from that environment, and runs `prefect.engine` as `python -m prefect.engine` would.

The helper forks only while it has a single thread. It refuses (and leaves) once Prefect's
installation changed on disk since its imports (an upgrade: the next run gets a new helper). It
leaves after `idle seconds` without children, when its socket is removed or replaced, or when
flowhand (its parent) is gone, always after its last child ended, so every child's end is still
reaped.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from typing import Any

#: Longest request accepted (a run's environment), and the most descriptors one may carry.
MAX_REQUEST = 1 << 20
TICK_SECONDS = 1.0
#: Unix socket addresses are limited to 108 bytes by the kernel.
MAX_SOCKET_PATH = 100
#: What the engine imports, beyond its own modules, before and while a flow runs: pull steps,
#: the runner's storage, the task engine, ... (measured with Prefect 3.8.8 and 3.9.1: 120
#: modules, 0.13 s of CPU a run, most of it before the run is RUNNING). Imported once here when
#: they exist; a name another Prefect release lacks is skipped.
WARM_UP_MODULES = (
    "prefect.deployments.steps.core", "prefect.deployments.steps.pull",
    "prefect.deployments.steps.utility", "prefect.runner.storage", "prefect.runner.runner",
    "prefect.task_engine", "prefect.utilities.visualization", "prefect.concurrency.sync",
    "prefect.concurrency.services", "prefect.bundles", "prefect._internal.metrics",
    "pydantic.v1", "packaging.requirements", "packaging.tags", "anyio._backends._asyncio",
    "anyio.streams.tls", "encodings.idna",
)


def _bind(listener: socket.socket, path: str) -> None:
    """Bind to `path`; under a deep directory through a descriptor of it (/proc/self/fd/N/name),
    since a socket address holds at most 108 bytes. (flowhand connects the same way; this
    script cannot import flowhand, hence its own few lines.)"""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        listener.bind(path)
        return
    directory = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{directory}/{os.path.basename(path)}")
    finally:
        os.close(directory)


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], int]:
    """The JSON request line and the descriptor sent with it."""
    data = b""
    fds: list[int] = []
    conn.settimeout(10)
    while not data.endswith(b"\n"):
        chunk, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            break
    for extra in fds[1:]:
        os.close(extra)
    if not data.endswith(b"\n") or not fds:
        if fds:
            os.close(fds[0])
        raise ValueError("incomplete request (a JSON line and one descriptor are expected)")
    return json.loads(data), fds[0]


def _installation() -> tuple[int, ...]:
    """What changes when Prefect or a package beside it is installed, upgraded or removed: the
    directory holding the `prefect` package (entries added or removed) and its __init__."""
    package = os.path.dirname(importlib.import_module("prefect").__file__ or "")
    found: list[int] = []
    for path in (os.path.dirname(package), os.path.join(package, "__init__.py")):
        try:
            st = os.stat(path)
            found += [st.st_ino, st.st_mtime_ns]
        except OSError:
            found += [0, 0]
    return tuple(found)


def _prefect_version() -> str | None:
    """The version of the Prefect this helper imported."""
    version = getattr(importlib.import_module("prefect"), "__version__", None)
    return version if isinstance(version, str) else None


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    # flowhand may have gone away: a restarted one watches the child through its pidfd.
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode() + b"\n")


def _run_engine(env: dict[str, str], cwd: str, out_fd: int, started: int) -> int:
    """In the forked child: become the run's engine process; the exit code."""
    os.setsid()
    # Only now may flowhand learn the PID: it signals the run's process group by it.
    os.write(started, b"s")
    os.close(started)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(null)
    os.close(out_fd)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    spec = importlib.util.find_spec("prefect.engine")
    # `python -m`: argv[0] is the module's file, sys.path[0] the working directory.
    sys.argv = [spec.origin if spec and spec.origin else "-m"]
    sys.path[0] = os.getcwd()
    # Settings and logging were built from the helper's environment at import: rebuild both
    # from the run's, as a fresh interpreter would have built them.
    context: Any = importlib.import_module("prefect.context")
    context.GLOBAL_SETTINGS_CONTEXT = context.root_settings_context()
    logging_configuration: Any = importlib.import_module("prefect.logging.configuration")
    logging_configuration.setup_logging(incremental=False)
    # runpy warns that the module it runs as __main__ was imported already: that is the point.
    warnings.filterwarnings("ignore", message="'prefect.engine' found in sys.modules",
                            category=RuntimeWarning)
    code = 0
    try:
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does on exit: join non-daemon threads, run atexit (Prefect flushes
    # its API log batches there), flush stdio.
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    return code


class Helper:
    def __init__(self, path: str, idle_seconds: float, parent: int) -> None:
        self.path = path
        self.idle_seconds = idle_seconds
        self.parent = parent
        old_umask = os.umask(0o177)  # the socket is created 0600: only flowhand's user connects
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _bind(self.listener, path)
        finally:
            os.umask(old_umask)
        self.listener.listen(64)
        self.inode = os.stat(path).st_ino
        self.installation = _installation()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        #: pidfd -> (pid, connection to report its end on)
        self.children: dict[int, tuple[int, socket.socket]] = {}
        self.last_busy = time.monotonic()
        self.accepting = True

    def serve(self) -> None:
        print("ready " + json.dumps({"prefect": _prefect_version()}), flush=True)
        while self.accepting or self.children:
            for key, _ in self.selector.select(TICK_SECONDS):
                if key.data is None:
                    self._accept()
                else:
                    self._reap(key.fd)
            if self.accepting and self._should_leave():
                self._stop_accepting()

    def _stop_accepting(self) -> None:
        self.accepting = False
        self.selector.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)

    def _should_leave(self) -> bool:
        try:
            socket_ok = os.stat(self.path).st_ino == self.inode
        except OSError:
            socket_ok = False
        idle = not self.children and time.monotonic() - self.last_busy > self.idle_seconds
        return not socket_ok or os.getppid() != self.parent or idle

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self.last_busy = time.monotonic()
        try:
            request, out_fd = _receive_request(conn)
        except (OSError, ValueError) as exc:
            _send(conn, {"error": f"bad request: {exc}"})
            conn.close()
            return
        if threading.active_count() != 1:
            os.close(out_fd)
            _send(conn, {"error": f"the helper has {threading.active_count()} threads; it "
                                  "forks only with one"})
            conn.close()
            return
        if _installation() != self.installation:
            # Its imported modules are no longer what is installed: a run forked from it would
            # run the old Prefect. Refuse, and leave (after the runs it forked ended).
            os.close(out_fd)
            _send(conn, {"error": "Prefect's installation changed since the helper imported "
                                  "it", "retired": True})
            conn.close()
            self._stop_accepting()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        started_r, started_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the helper's loop
            code = 1
            try:
                os.close(started_r)
                self.selector.close()
                self.listener.close()
                conn.close()
                for pidfd, (_, other) in self.children.items():
                    os.close(pidfd)
                    other.close()
                code = _run_engine(request["env"], request["cwd"], out_fd, started_w)
            finally:
                os._exit(code)
        os.close(out_fd)
        os.close(started_w)
        os.read(started_r, 1)  # its session exists (or it died: then the read returns b"")
        os.close(started_r)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        _send(conn, {"pid": pid})

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        conn.close()
        self.last_busy = time.monotonic()


def main() -> None:
    path, idle = sys.argv[1], float(sys.argv[2])
    # Before the long imports: a flowhand gone meanwhile is noticed at the first look.
    parent = os.getppid()
    # The expensive part, done once: Prefect and its engine's modules.
    for module in ("prefect", "prefect.engine", "prefect.flow_engine"):
        importlib.import_module(module)
    for module in WARM_UP_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    Helper(path, idle, parent).serve()


if __name__ == "__main__":
    main()
