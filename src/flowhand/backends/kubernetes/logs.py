"""A pod's logs: the Kubernetes backend's `OutputSource` for the output pump.

Polled, not followed (a follow is a stream per run): each read asks for the lines since the last
read, with their timestamps, and drops the ones already seen. The pod is the Job's newest, looked
up in the watch's cache at each read, so a retried pod's output follows on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from lightkube import AsyncClient
from structlog.typing import FilteringBoundLogger

from flowhand.backends.kubernetes.cluster import CLUSTER_ERRORS, api_error_text
from flowhand.backends.output import last_nonblank

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.kubernetes")


class PodLogs:
    """Reads the run's pod's logs from where the last read stopped."""

    def __init__(self, client: AsyncClient, namespace: str,
                 pod_name: Callable[[], str | None]) -> None:
        self.client = client
        self.namespace = namespace
        self.pod_name = pod_name
        #: (pod, newest timestamp read) and when that read was made.
        self._pod: str | None = None
        self._stamp = ""
        self._read_at: float | None = None

    async def _lines(self, pod: str, since: int | None, tail: int | None) -> list[str]:
        try:
            return [line async for line in self.client.log(
                pod, namespace=self.namespace, container="prefect-job", since=since,
                tail_lines=tail, timestamps=True)]
        except CLUSTER_ERRORS as exc:  # not started, gone, or a node that serves no logs
            log.debug("kubernetes.logs_failed", pod=pod, error=api_error_text(exc))
            return []

    async def read(self, final: bool) -> bytes:
        pod = self.pod_name()
        if pod is None:
            return b""
        if pod != self._pod:
            self._pod, self._stamp, self._read_at = pod, "", None
        since = int(time.monotonic() - self._read_at) + 2 if self._read_at else None
        self._read_at = time.monotonic()
        out = []
        for line in await self._lines(pod, since, None):
            stamp, _, text = line.partition(" ")
            if stamp <= self._stamp:
                continue
            self._stamp = stamp
            out.append(text if text.endswith("\n") else text + "\n")
        return "".join(out).encode()

    async def last_lines(self, count: int) -> list[str]:
        pod = self.pod_name()
        if pod is None:
            return []
        lines = await self._lines(pod, None, count * 4)
        return last_nonblank([line.partition(" ")[2].rstrip("\n") for line in lines], count)
