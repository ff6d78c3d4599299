"""The watch multiplexer: one watch of Jobs and one of pods per namespace, for all runs.

A run does not watch its own Job (a stream per run is what makes Prefect's worker heavy on the
apiserver): each `Feed` lists a namespace's Jobs and pods of one work pool once, then follows
both from the last resourceVersion, keeps the newest object of each in memory and wakes the
runs whose Job or pod changed. A watch that ends (the apiserver's timeout, a dropped connection)
is resumed from where it stopped; 410 Gone (that version is too old) lists again, and whatever
the new list lacks was deleted meanwhile.

The feed needs no task of its own: every run waiting on it calls `follow()`, and one of them at
a time (whoever holds the lock) drives the watches; when that run ends, the next takes over
from the same resourceVersion, so nothing is missed and nothing runs when nobody waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import httpx
import structlog
from lightkube import ApiError, AsyncClient
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod
from structlog.typing import FilteringBoundLogger

from flowhand.backends.kubernetes.cluster import as_dict
from flowhand.backends.kubernetes.podevents import pod_phase

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.kubernetes")

#: Labels the Job controller puts on a Job's pods (the newer first).
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
#: After a failed watch or list, wait this long before the next try, doubling up to the maximum.
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
#: How long a waiter waits for the feed's first list before looking on its own.
SYNC_WAIT_SECONDS = 30.0


def job_of_pod(pod: dict[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for key in JOB_NAME_LABELS:
        if labels.get(key):
            return str(labels[key])
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("kind") == "Job":
            return str(owner.get("name"))
    return None


@dataclass
class Tracked:
    """What one Job's waiter sees: the Job (None once deleted) and its pods (kept after their
    deletion, for the reason they say)."""

    job: dict[str, Any] | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The phase each pod's event was sent for.
    phases: dict[str, str] = field(default_factory=dict)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def touch(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class Feed:
    """The Jobs and pods of one work pool in one namespace, as the watches last said."""

    def __init__(self, client: AsyncClient, namespace: str, selector: dict[str, Any],
                 watch_timeout: int) -> None:
        self.client = client
        self.namespace = namespace
        self.selector = selector
        self.watch_timeout = watch_timeout
        self.jobs: dict[str, Tracked] = {}
        #: The resourceVersion each watch resumes from; None: list first.
        self.versions: dict[str, str | None] = {"Job": None, "Pod": None}
        self.synced = anyio.Event()
        self._driver = anyio.Lock()
        #: Jobs with someone waiting on them: kept even before the watch has seen them.
        self.waited: set[str] = set()
        #: Counted for the bench and tests: lists and watch requests made.
        self.requests = 0
        #: Told each new phase of a pod of a Job someone here waits on (Prefect's pod events).
        self.on_pod: Callable[[dict[str, Any]], None] | None = None

    def tracked(self, name: str) -> Tracked:
        return self.jobs.setdefault(name, Tracked())

    # -- applying what the apiserver says ---------------------------------------------------

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name"))
        if kind == "Job":
            entry = self.tracked(name)
            entry.job = None if event == "DELETED" else obj
            if event == "DELETED" and name not in self.waited:
                self.jobs.pop(name, None)
            entry.touch()
            return
        job_name = job_of_pod(obj)
        if job_name is None:
            return
        entry = self.tracked(job_name)
        if event == "DELETED":
            obj = {**obj, "metadata": {**(obj.get("metadata") or {}),
                                       "deletionTimestamp": (obj.get("metadata") or {}).get(
                                           "deletionTimestamp") or "deleted"}}
        entry.pods[name] = obj
        phase = pod_phase(obj)
        if self.on_pod is not None and job_name in self.waited and phase \
                and entry.phases.get(name) != phase:
            entry.phases[name] = phase
            self.on_pod(obj)
        entry.touch()

    def replace_all(self, kind: str, objs: list[dict[str, Any]]) -> None:
        """A fresh list: what it lacks was deleted while nobody watched."""
        seen: set[str] = set()
        for obj in objs:
            self.apply(kind, "ADDED", obj)
            name = str((obj.get("metadata") or {}).get("name"))
            seen.add(name if kind == "Job" else f"{job_of_pod(obj)}/{name}")
        for job_name, entry in list(self.jobs.items()):
            if kind == "Job" and job_name not in seen and entry.job is not None:
                self.apply("Job", "DELETED", entry.job)
            if kind == "Pod":
                for pod_name, pod in list(entry.pods.items()):
                    if f"{job_name}/{pod_name}" not in seen:
                        self.apply("Pod", "DELETED", pod)

    # -- driving the watches ----------------------------------------------------------------

    async def follow(self) -> None:
        """Drive the watches while this caller waits, when nobody else does; never returns."""
        async with self._driver, anyio.create_task_group() as tg:
            tg.start_soon(self._run, Job, "Job")
            tg.start_soon(self._run, Pod, "Pod")
            await anyio.sleep_forever()

    async def _run(self, resource: Any, kind: str) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                if self.versions[kind] is None:
                    await self._list(resource, kind)
                await self._watch(resource, kind)
                delay = RETRY_MIN_SECONDS
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("kubernetes.watch_expired", kind=kind, namespace=self.namespace)
                    self.versions[kind] = None
                    continue
                log.warning("kubernetes.watch_failed", kind=kind, namespace=self.namespace,
                            error=str(exc.status.message), code=exc.status.code)
            except (httpx.HTTPError, OSError) as exc:
                log.warning("kubernetes.watch_failed", kind=kind, namespace=self.namespace,
                            error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _list(self, resource: Any, kind: str) -> None:
        self.requests += 1
        listing = self.client.list(resource, namespace=self.namespace, labels=self.selector)
        objs = [as_dict(obj) async for obj in listing]
        self.versions[kind] = listing.resourceVersion
        self.replace_all(kind, objs)
        if all(v is not None for v in self.versions.values()):
            self.synced.set()

    async def _watch(self, resource: Any, kind: str) -> None:
        """One watch request, from the last version until the apiserver ends it."""
        self.requests += 1
        stream = self.client.watch(resource, namespace=self.namespace, labels=self.selector,
                                   server_timeout=self.watch_timeout,
                                   resource_version=self.versions[kind])
        # lightkube makes the next request itself when the apiserver ends one, from the last
        # version it saw (ours too); an error (410 Gone included) comes here.
        # Closed when the driver hands over (cancelled): its connection goes back at once.
        async with contextlib.aclosing(cast(AsyncGenerator[Any, None], stream)) as events:
            async for event, model in events:
                obj = as_dict(model)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.versions[kind] = str(version)
                if str(event) in ("ADDED", "MODIFIED", "DELETED"):
                    self.apply(kind, str(event), obj)

    # -- waiting ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def waiting(self, name: str) -> AsyncIterator[Tracked]:
        """Follow `name` while the block runs; the feed is driven meanwhile."""
        self.waited.add(name)
        entry = self.tracked(name)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.follow)
                # Without a first list (no permission, no answer) the run is still followed:
                # its Job is read directly, and the watch keeps trying.
                with anyio.move_on_after(SYNC_WAIT_SECONDS):
                    await self.synced.wait()
                yield entry
                tg.cancel_scope.cancel()
        finally:
            self.waited.discard(name)
            if entry.job is None:
                self.jobs.pop(name, None)

    def forget(self, name: str) -> None:
        if name not in self.waited:
            self.jobs.pop(name, None)


FeedKey = tuple[str, str, str]
FeedFactory = Callable[[str, dict[str, str]], Feed]
