"""One run's wait on the watch feed: from what its Job and pods say to how the run ended.

Woken by the feed whenever its Job or a pod changes, and by its own deadlines. A pod that only
waits for a node (or for quota) waits: why is said once in the run's logs, and the run ends only
when `pod_watch_timeout_seconds` passes (its Job is then deleted so it cannot start later). A pod
that can never start ends the run at once. A Job the watch has not seen yet is read once before
it is called vanished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog
from lightkube import ApiError
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import Event as K8sEvent
from structlog.typing import FilteringBoundLogger

from flowhand.backends.kubernetes.cluster import CLUSTER_ERRORS, api_error_text, as_dict
from flowhand.backends.kubernetes.status import (
    Ended,
    Running,
    Verdict,
    Waiting,
    create_refusal,
    latest_pod,
    read_verdict,
)
from flowhand.backends.kubernetes.watch import Feed, Tracked

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.kubernetes")

#: A Job without a pod this long is asked for its events (a quota or admission refusal).
EVENTS_AFTER_SECONDS = 3.0
EVENTS_EVERY_SECONDS = 5.0
#: Even with no change, look again this often (deadlines, a stalled watch).
IDLE_SECONDS = 30.0

Note = Callable[[int, str], None]


@dataclass
class WatchLimits:
    pod_seconds: float = 60.0
    job_seconds: float | None = None
    #: time.monotonic() when the Job was created.
    started: float = field(default_factory=time.monotonic)


class RunWatch:
    def __init__(self, feed: Feed, job_name: str, limits: WatchLimits, note: Note) -> None:
        self.feed = feed
        self.job_name = job_name
        self.limits = limits
        self.note = note
        self._said: set[str] = set()
        self._running_since: float | None = None
        self._confirmed = False
        self._events_at = 0.0
        self._refusal: Verdict | None = None
        self._entry: Tracked | None = None

    def pod_name(self) -> str | None:
        """The Job's newest pod, for its logs, once its container has started (before, a log
        request is only an error)."""
        if self._entry is None:
            return None
        pod = latest_pod(self._entry.pods.values())
        if pod is None or (pod.get("status") or {}).get("phase") not in (
                "Running", "Succeeded", "Failed"):
            return None
        return str((pod.get("metadata") or {}).get("name"))

    def say(self, level: int, text: str, key: str | None = None) -> None:
        """Say `text` in the run's logs, once per `key` (default: the text itself)."""
        key = text if key is None else key
        if key not in self._said:
            self._said.add(key)
            self.note(level, text)

    async def until_ended(self, entry: Tracked) -> Ended:
        self._entry = entry
        while True:
            changed = entry.changed
            if entry.job is None and not self._confirmed:
                await self._confirm(entry)
            verdict = read_verdict(entry.job, entry.pods.values(), self.job_name)
            if isinstance(verdict, Waiting) and not entry.pods:
                verdict = await self._refused(entry) or verdict
            ended = self._judge(verdict)
            if ended is not None:
                return ended
            with anyio.move_on_after(self._next_look()):
                await changed.wait()

    def _judge(self, verdict: Verdict) -> Ended | None:
        now = time.monotonic()
        if isinstance(verdict, Ended):
            return verdict
        if isinstance(verdict, Running):
            if self._running_since is None:
                self._running_since = now
                log.debug("kubernetes.pod_running", job=self.job_name, pod=verdict.pod_name)
            limit = self.limits.job_seconds
            if limit is not None and now - self._running_since > limit:
                return Ended(None, f"The Job ran longer than job_watch_timeout_seconds={limit:g}"
                             "; flowhand deleted it.", never_started=True)
            return None
        if self._running_since is not None:
            return None  # a pod that ran and ended: the Job controller decides
        if verdict.capacity or verdict.why.startswith("The pod cannot be created yet"):
            # Once per kind of wait: the scheduler rewords its reason as nodes come and go
            # (a new node's not-ready taint), which is not news to the run's reader.
            self.say(30, verdict.why, key="capacity" if verdict.capacity else "not created")
        waited = now - self.limits.started
        if waited > self.limits.pod_seconds:
            return Ended(None, f"{verdict.why.rstrip('.')}. The pod did not start within "
                         f"pod_watch_timeout_seconds={self.limits.pod_seconds:g}; flowhand "
                         "deleted the Job so that it cannot start later.", never_started=True)
        return None

    def _next_look(self) -> float:
        now = time.monotonic()
        wake = [IDLE_SECONDS]
        if self._running_since is None:
            wake.append(self.limits.started + self.limits.pod_seconds - now + 0.1)
            wake.append(EVENTS_EVERY_SECONDS)
        elif self.limits.job_seconds is not None:
            wake.append(self._running_since + self.limits.job_seconds - now + 0.1)
        return max(0.1, min(wake))

    async def _confirm(self, entry: Tracked) -> None:
        """A Job the watch has not shown (yet): read it once; 404 means it is gone."""
        try:
            found = await self.feed.client.get(K8sJob, self.job_name,
                                               namespace=self.feed.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                self._confirmed = True
                return
            log.warning("kubernetes.job_read_failed", job=self.job_name,
                        error=api_error_text(exc))
            return
        except CLUSTER_ERRORS as exc:
            log.warning("kubernetes.job_read_failed", job=self.job_name,
                        error=api_error_text(exc))
            return
        self._confirmed = True
        if entry.job is None:
            self.feed.apply("Job", "ADDED", as_dict(found))

    async def _refused(self, entry: Tracked) -> Verdict | None:
        """The Job controller's FailedCreate events, read now and then while there is no pod."""
        now = time.monotonic()
        if now - self.limits.started < EVENTS_AFTER_SECONDS or \
                now - self._events_at < EVENTS_EVERY_SECONDS:
            return self._refusal
        self._events_at = now
        try:
            events = [as_dict(e) async for e in self.feed.client.list(
                K8sEvent, namespace=self.feed.namespace,
                fields={"involvedObject.name": self.job_name, "involvedObject.kind": "Job"})]
        except CLUSTER_ERRORS as exc:
            log.debug("kubernetes.events_failed", job=self.job_name, error=api_error_text(exc))
            return self._refusal
        self._refusal = create_refusal(events)
        return self._refusal
