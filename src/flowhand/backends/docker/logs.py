"""A container's logs: the Docker backend's `OutputSource` for the output pump.

Polled with `logs(since=...)`, not followed: a follow stream is a connection held per container.
Each read is one short call to the daemon.
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime

import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.daemon import Daemon
from flowhand.backends.docker.errors import DOCKER_ERRORS, explain
from flowhand.backends.output import last_nonblank, split_lines

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")


def parse_docker_time(text: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 timestamp as Docker writes it, or None."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", text)
    if not match:
        return None
    seconds = calendar.timegm(datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S").timetuple())
    return seconds * 1_000_000_000 + int((match[2] or "0").ljust(9, "0"))


class ContainerLogs:
    """Reads one container's logs from where the last read stopped."""

    def __init__(self, daemon: Daemon, container_id: str, tty: bool = False) -> None:
        self.daemon = daemon
        self.container_id = container_id
        #: The container has a TTY: its output comes unframed.
        self.tty = tty
        #: Docker's timestamp (ns) of the last line read.
        self.read_ns = 0

    async def read(self, final: bool) -> bytes:
        # Docker's lines are always whole: `final` changes nothing.
        engine = await self.daemon.client()
        # `since` is inclusive and a float loses nanoseconds: go back a little and drop what
        # was already read by its exact timestamp.
        since = self.read_ns / 1e9 - 1e-6 if self.read_ns else None
        try:
            data = await engine.logs(self.container_id, tty=self.tty, timestamps=True,
                                     since=since)
        except DOCKER_ERRORS as exc:  # gone (auto_remove) or unreachable: no output
            log.debug("docker.logs_failed", container_id=self.container_id, error=explain(exc))
            return b""
        lines = []
        for line in split_lines(data):
            stamp, _, text = line.partition(" ")
            ns = parse_docker_time(stamp)
            if ns is None:
                text = line
            elif ns <= self.read_ns:
                continue
            else:
                self.read_ns = ns
            lines.append(f"{text}\n")
        return "".join(lines).encode()

    async def last_lines(self, count: int) -> list[str]:
        engine = await self.daemon.client()
        try:
            data = await engine.logs(self.container_id, tty=self.tty, tail=count * 4)
        except DOCKER_ERRORS as exc:  # auto_remove may have won the race
            log.debug("docker.logs_failed", container_id=self.container_id, error=explain(exc))
            return []
        return last_nonblank(split_lines(data), count)
