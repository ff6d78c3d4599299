"""Warm helpers: started on demand, one per environment key, asked to fork one run each.

A key is the interpreter and the environment variables that shape what importing Prefect does
(PREFECT_* settings and PYTHON*; Prefect's per-run PREFECT__* variables excepted): a run whose
key differs from every helper's gets a helper of its own, up to `warm_max_helpers`, and only
while the machine has `warm_memory_budget` available; else a cold start. A helper reports the
Prefect it imported before it forks anything: one not proven warm (`proven.py`) is stopped and
that key's runs start cold (looked at again after `warm_idle_seconds`). Whatever goes wrong with
a helper (it cannot start, died, its socket is gone, it refused) makes that run start cold, with
one log line naming the reason (once per key for a lasting reason: a policy, not a fault); a
helper that failed is started again only after a pause that doubles with each failure
(`service_loop.Backoff`, as every retry in flowhand). Each fork and each fallback is counted
for the worker's metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import CountEvent
from flowhand.backends.process.warm.memory import available_bytes
from flowhand.backends.process.warm.proven import described, proven
from flowhand.backends.process.warm.settings import WarmSettings
from flowhand.service_loop import Backoff

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.process.warm")
HELPER_SCRIPT = Path(__file__).with_name("engine_helper.py")
#: Importing Prefect takes seconds, many on a busy machine.
READY_TIMEOUT_SECONDS = 120.0
REPLY_TIMEOUT_SECONDS = 30.0
#: The helper's line once it listens, with what it imported: `ready {"prefect": "3.9.1"}`.
READY_LINE = re.compile(rb"(?:^|\n)ready ?([^\n]*)\n")
#: Unix socket addresses are limited to 108 bytes by the kernel.
MAX_SOCKET_PATH = 100
#: The pause before a failed helper's key gets a new helper: 1 s, doubling with each failure,
#: jittered (between half and all of it).
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0


def open_pidfd(pid: int) -> int | None:
    """A pidfd, or None when the process already ended (a warm run that lasted an instant: its
    status still comes from its helper)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for the socket at `path` that fits a Unix socket address: the path itself, or,
    under a deep state_dir, the same file reached through a descriptor of its directory
    (/proc/self/fd/N/name), so a long path never costs the warm start."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def unproven_reason(version: str) -> str:
    return (f"the run's Prefect is {version}, not a release the compatibility suite runs warm "
            f"({described()})")


class WarmUnavailable(Exception):
    """No warm start for this run; the message says why (the run starts cold), `kind` names the
    reason for metrics; a `lasting` reason (a policy, not a fault) is logged once per helper
    key until a helper for it works again."""

    def __init__(self, message: str, kind: str = "helper_failed", lasting: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.lasting = lasting


def environment_key(python: str, env: dict[str, str]) -> str:
    """What a helper's imports depend on; runs differing here never share a helper."""
    shaping = sorted((k, v) for k, v in env.items()
                     if (k.startswith("PREFECT_") and not k.startswith("PREFECT__"))
                     or k.startswith("PYTHON"))
    text = json.dumps([python, shaping])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class WarmChild:
    """A run forked by a helper: its PID, and the connection its exit status arrives on."""

    pid: int
    stream: UNIXSocketStream = field(repr=False)
    reader: BufferedByteReceiveStream = field(repr=False)

    async def exit_code(self) -> int | None:
        """The status the helper reports once the run ended; None when the helper is gone."""
        try:
            with anyio.fail_after(5.0):
                reply = json.loads(await self.reader.receive_until(b"\n", 4096))
            code = reply.get("exit")
            return code if isinstance(code, int) else None
        except Exception:  # noqa: BLE001 - a lost status is reported as unknown, as on re-attach
            return None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


@dataclass
class _Helper:
    key: str
    socket_path: Path
    process: subprocess.Popen[bytes]
    ready: anyio.Event = field(default_factory=anyio.Event)
    failure: WarmUnavailable | None = None
    #: The Prefect version the helper imported, as it reported when ready.
    prefect_version: str | None = None


class WarmEngines:
    """The helpers of one process backend."""

    def __init__(self, settings: WarmSettings, state_dir: Path,
                 count: CountEvent | None = None) -> None:
        self.settings = settings
        self.directory = Path(state_dir) / "warm"
        self._count = count or (lambda event, reason: None)
        self._helpers: dict[str, _Helper] = {}
        #: Keys whose helper imported a Prefect not proven warm: (version, when to look again).
        self._unproven: dict[str, tuple[str, float]] = {}
        #: (key, reason kind) of lasting fallbacks already logged.
        self._said: set[tuple[str, str]] = set()
        #: Per environment key: its helpers' consecutive failures, and when the next may start.
        self._backoff: dict[str, tuple[Backoff, float]] = {}
        #: Helpers no longer used, still finishing their runs: reaped once they left.
        self._leaving: list[_Helper] = []

    async def start(self, python: str, env: dict[str, str], cwd: str, output_fd: int,
                    flow_run_id: uuid.UUID) -> WarmChild | None:
        """The run forked by a helper, its stdout and stderr the descriptor `output_fd` (the
        run's output pipe, as a cold start gets it), or None, logged once with the reason:
        then the run starts cold."""
        key = environment_key(python, env)
        try:
            helper = await self._helper(key, python, env)
            child = await self._fork(helper, env, cwd, output_fd)
        except WarmUnavailable as exc:
            self._fell_back(key, flow_run_id, exc)
            return None
        self._count("warm_start_forked", "")
        log.info("warm_start.forked", flow_run_id=str(flow_run_id), helper=key, pid=child.pid,
                 prefect=helper.prefect_version)
        return child

    def _fell_back(self, key: str, flow_run_id: uuid.UUID, exc: WarmUnavailable) -> None:
        """Count the cold start; say why, once for a lasting reason."""
        self._count("warm_start_fallback", exc.kind)
        said = (key, exc.kind)
        if exc.lasting and said in self._said:
            log.debug("warm_start.cold", flow_run_id=str(flow_run_id), reason=str(exc))
            return
        if exc.lasting:
            self._said.add(said)
        log.warning("warm_start.fallback", flow_run_id=str(flow_run_id), reason=str(exc),
                    kind=exc.kind)

    # -- helpers ----------------------------------------------------------------------------

    def _forget_dead(self) -> None:
        self._leaving = [h for h in self._leaving if h.process.poll() is None]
        for key, helper in list(self._helpers.items()):
            code = helper.process.poll()
            if code is None:
                continue
            del self._helpers[key]
            if code != 0:  # 0: it left on its own (idle); anything else is a failure
                self._failed(key)

    def _failed(self, key: str) -> None:
        backoff, _ = self._backoff.get(key) or (Backoff(BACKOFF_BASE_SECONDS,
                                                        BACKOFF_MAX_SECONDS), 0.0)
        self._backoff[key] = (backoff, time.monotonic() + backoff.failed())

    async def _helper(self, key: str, python: str, env: dict[str, str]) -> _Helper:
        self._forget_dead()
        helper = self._helpers.get(key)
        if helper is None:
            self._may_launch(key)
            helper = self._launch(key, python, env)
            self._helpers[key] = helper
            await self._await_ready(helper)
        else:
            await helper.ready.wait()
        if helper.failure is not None:
            raise helper.failure
        return helper

    def _may_launch(self, key: str) -> None:
        """WarmUnavailable when no helper may be started for `key` now."""
        version, look_again = self._unproven.get(key, ("", 0.0))
        if time.monotonic() < look_again:
            raise WarmUnavailable(unproven_reason(version), "unproven_prefect", lasting=True)
        _, not_before = self._backoff.get(key, (None, 0.0))
        if time.monotonic() < not_before:
            wait = not_before - time.monotonic()
            raise WarmUnavailable(f"its helper failed; restarting it in {wait:.0f} s", "backoff")
        if len(self._helpers) >= self.settings.warm_max_helpers:
            raise WarmUnavailable(
                f"its environment needs another helper and {len(self._helpers)} are "
                "running (warm_max_helpers)", "max_helpers", lasting=True)
        budget = self.settings.warm_memory_budget
        free = available_bytes() if budget else None
        if free is not None and free < budget:
            raise WarmUnavailable(
                f"{free >> 20} MiB of memory available, under warm_memory_budget "
                f"({budget >> 20} MiB) for a new helper", "memory", lasting=True)

    def _launch(self, key: str, python: str, env: dict[str, str]) -> _Helper:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        socket_path = self.directory / f"{key}.sock"
        # The helper keeps no run's own variables: each child gets its run's whole environment.
        helper_env = {k: v for k, v in env.items() if not k.startswith("PREFECT__")}
        # The helper's own stderr (its runs write to their output files): flowhand's user only.
        err_fd = os.open(self.directory / f"{key}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600)
        with os.fdopen(err_fd, "ab") as err:
            try:
                process = subprocess.Popen(
                    [python, str(HELPER_SCRIPT), str(socket_path),
                     str(self.settings.warm_idle_seconds)],
                    env=helper_env, cwd=str(self.directory), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            except OSError as exc:
                self._failed(key)
                raise WarmUnavailable(f"cannot start a helper: {exc.strerror or exc}") from None
        log.info("warm_start.helper_started", helper=key, pid=process.pid, python=python)
        return _Helper(key, socket_path, process)

    async def _await_ready(self, helper: _Helper) -> None:
        """Until the helper said it is ready and which Prefect it imported; a helper that
        failed, or imported a Prefect not proven warm, is stopped (`helper.failure` says why)."""
        try:
            helper.prefect_version = await self._ready_line(helper)
            if not proven(helper.prefect_version):
                version = helper.prefect_version or "of an unknown version"
                self._unproven[helper.key] = (version, time.monotonic()
                                              + self.settings.warm_idle_seconds)
                helper.failure = WarmUnavailable(unproven_reason(version), "unproven_prefect",
                                                 lasting=True)
        except TimeoutError:
            helper.failure = WarmUnavailable(
                f"the helper was not ready after {READY_TIMEOUT_SECONDS:.0f} s")
        except WarmUnavailable as exc:
            helper.failure = exc
        finally:
            helper.ready.set()
        if helper.failure is None:
            self._backoff.pop(helper.key, None)
            self._unproven.pop(helper.key, None)
            self._said = {said for said in self._said if said[0] != helper.key}
            log.info("warm_start.helper_ready", helper=helper.key, pid=helper.process.pid,
                     prefect=helper.prefect_version)
            return
        self._helpers.pop(helper.key, None)
        if helper.failure.kind != "unproven_prefect":
            self._failed(helper.key)
        with contextlib.suppress(ProcessLookupError):
            helper.process.kill()
        helper.process.wait()

    async def _ready_line(self, helper: _Helper) -> str | None:
        """The Prefect version in the helper's `ready {"prefect": "3.9.1"}` line."""
        stdout = helper.process.stdout
        assert stdout is not None
        seen = b""
        try:
            with anyio.fail_after(READY_TIMEOUT_SECONDS):
                while (found := READY_LINE.search(seen)) is None:
                    await anyio.wait_readable(stdout.fileno())
                    chunk = os.read(stdout.fileno(), 4096)
                    if not chunk:
                        code = helper.process.wait()
                        tail = (self.directory / f"{helper.key}.log").read_bytes()[-300:]
                        raise WarmUnavailable(f"the helper exited ({code}) before it was "
                                              f"ready: {tail.decode(errors='replace')!r}")
                    seen += chunk
        finally:
            stdout.close()
        try:
            version = json.loads(found.group(1) or b"{}").get("prefect")
        except (ValueError, AttributeError):
            version = None
        return version if isinstance(version, str) else None

    async def _fork(self, helper: _Helper, env: dict[str, str], cwd: str,
                    out_fd: int) -> WarmChild:
        try:
            with socket_address(helper.socket_path) as address:
                stream = await anyio.connect_unix(address)
        except OSError as exc:
            self._drop(helper)
            raise WarmUnavailable(f"cannot reach the helper: {exc.strerror or exc}") from None
        reader = BufferedByteReceiveStream(stream)
        try:
            request = json.dumps({"env": env, "cwd": cwd}).encode() + b"\n"
            with anyio.fail_after(REPLY_TIMEOUT_SECONDS):
                await stream.send_fds(request, [out_fd])
                reply: dict[str, Any] = json.loads(await reader.receive_until(b"\n", 65536))
        except Exception as exc:  # noqa: BLE001 - any failure here means: start cold
            await stream.aclose()
            self._drop(helper)
            raise WarmUnavailable(f"the helper did not answer: {exc!r}") from None
        pid = reply.get("pid")
        if not isinstance(pid, int):
            await stream.aclose()
            if reply.get("retired"):
                # Not a failure (Prefect was upgraded): the next run gets a new helper at once.
                self._drop(helper, failed=False)
            raise WarmUnavailable(f"the helper refused: {reply.get('error', reply)}",
                                  "retired" if reply.get("retired") else "helper_failed")
        return WarmChild(pid, stream, reader)

    def _drop(self, helper: _Helper, failed: bool = True) -> None:
        """A helper that failed a request (or retired): stop using it (it leaves once its runs
        ended); after a failure, a new one only after the backoff."""
        if self._helpers.get(helper.key) is helper:
            del self._helpers[helper.key]
            self._leaving.append(helper)
            if failed:
                self._failed(helper.key)
        with contextlib.suppress(OSError):
            if helper.process.poll() is None:
                # Its socket is gone or broken: it stops accepting and leaves after its runs.
                helper.socket_path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Nothing to stop: helpers leave once flowhand is gone and their runs ended."""
        self._forget_dead()
