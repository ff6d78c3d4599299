"""The Kubernetes backend: each run a batch/v1 Job, watched with the pool's other Jobs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import anyio
import structlog
from lightkube import ApiError
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.types import CascadeType
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import (
    Backend,
    BackendContext,
    Exit,
    Handle,
    Job,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.backends.kubernetes.cluster import (
    CLUSTER_ERRORS,
    Clusters,
    api_error_text,
    as_dict,
    cluster_key,
)
from flowhand.backends.kubernetes.logs import PodLogs
from flowhand.backends.kubernetes.manifest import (
    ATTEMPT_ANNOTATION,
    FLOW_RUN_LABEL,
    JOB_TIMEOUT_ANNOTATION,
    POD_TIMEOUT_ANNOTATION,
    POOL_LABEL,
    job_manifest,
    label_value,
    namespace_of,
    parse_pid,
)
from flowhand.backends.kubernetes.podevents import pod_event
from flowhand.backends.kubernetes.runwatch import RunWatch, WatchLimits
from flowhand.backends.kubernetes.settings import KubernetesJobConfig, KubernetesSettings
from flowhand.backends.kubernetes.status import Ended
from flowhand.backends.kubernetes.watch import Feed
from flowhand.backends.output import OutputPump
from flowhand.clock import utcnow
from flowhand.errors import InfrastructureError, LaunchFailed

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.kubernetes")

STREAM_MIN_SECONDS = 1.0
STREAM_MAX_SECONDS = 10.0


@dataclass
class KubernetesHandle(Handle):
    namespace: str = ""
    job_name: str = ""
    pool_label: str = ""
    cluster_config: dict[str, Any] | None = None
    stream_output: bool = False
    limits: WatchLimits = field(default_factory=WatchLimits)
    sink: OutputSink | None = field(default=None, repr=False)


def _age_seconds(created: Any) -> float:
    """Seconds since a Job's creationTimestamp (a datetime or RFC 3339 text)."""
    if isinstance(created, str):
        created = datetime.fromisoformat(created.replace("Z", "+00:00"))
    if not isinstance(created, datetime):
        return 0.0
    return max(0.0, (utcnow() - created).total_seconds())


class KubernetesBackend(Backend):
    """Start each run as a Job in a Kubernetes cluster, as Prefect's kubernetes worker does."""

    pool_type: ClassVar[str] = "kubernetes"
    settings_section = "kubernetes"
    settings_model = KubernetesSettings
    settings: KubernetesSettings
    job_model = KubernetesJobConfig
    template_resource = "kubernetes.json"

    def __init__(self, settings: KubernetesSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.clusters = Clusters(settings.context, settings.request_timeout_seconds)
        self.feeds: dict[tuple[str, str, str], Feed] = {}

    @property
    def kill_grace_seconds(self) -> float:
        grace = self.settings.kill_grace_seconds
        return 30.0 if grace is None else float(grace)

    def feed(self, cluster_config: dict[str, Any] | None, namespace: str, pool: str) -> Feed:
        """The watch feed of one pool's Jobs in one namespace (made on first use)."""
        key = (cluster_key(cluster_config), namespace, pool)
        found = self.feeds.get(key)
        if found is None:
            found = Feed(self.clusters.client(cluster_config), namespace, {POOL_LABEL: pool},
                         self.settings.watch_timeout_seconds)
            found.on_pod = self._pod_changed
            self.feeds[key] = found
        return found

    def _pod_changed(self, pod: dict[str, Any]) -> None:
        event = pod_event(pod)
        if event is not None:
            self.emit_event(event.name, event.resource, event.related, event.id)

    # -- starting ---------------------------------------------------------------------------

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        cfg = job.config
        assert isinstance(cfg, KubernetesJobConfig)
        manifest = job_manifest(job, cfg)
        namespace = namespace_of(manifest)
        attempt = str(uuid.uuid4())
        manifest["metadata"]["annotations"][ATTEMPT_ANNOTATION] = attempt
        # Once the Job exists it must be recorded: a shutdown arriving in between must not
        # leave it unknown.
        with anyio.CancelScope(shield=True):
            name = await self._create(cfg.cluster_config, manifest, job.flow_run_id, attempt)
            pid = f"{namespace}:{name}"
            log.info("kubernetes.job_created", flow_run_id=str(job.flow_run_id), job=name,
                     namespace=namespace)
            await record_pid(pid)
        return KubernetesHandle(
            infrastructure_pid=pid, flow_run_id=job.flow_run_id, namespace=namespace,
            job_name=name, pool_label=manifest["metadata"]["labels"].get(POOL_LABEL, ""),
            cluster_config=cfg.cluster_config, stream_output=cfg.stream_output,
            limits=WatchLimits(pod_seconds=cfg.pod_watch_timeout_seconds,
                               job_seconds=cfg.job_watch_timeout_seconds),
            sink=job.output_sink,
        )

    async def _create(self, cluster_config: dict[str, Any] | None, manifest: dict[str, Any],
                      flow_run_id: uuid.UUID, attempt: str) -> str:
        """Create the Job; its name. An answer lost on the way back (the connection dropped)
        is looked for by this attempt's annotation before the launch counts as failed."""
        client = self.clusters.client(cluster_config)
        namespace = namespace_of(manifest)
        try:
            created = await client.create(
                K8sJob.from_dict(manifest))  # type: ignore[no-untyped-call]
        except ApiError as exc:
            raise LaunchFailed("the Kubernetes API refused to create the Job in namespace "
                               f"{namespace!r}: {api_error_text(exc)}") from None
        except CLUSTER_ERRORS as exc:
            found = await self._created_anyway(client, namespace, flow_run_id, attempt)
            if found is None:
                raise LaunchFailed(f"cannot create the Job in namespace {namespace!r}: "
                                   f"{api_error_text(exc)}") from None
            return found
        assert created.metadata is not None and created.metadata.name is not None
        return str(created.metadata.name)

    async def _created_anyway(self, client: Any, namespace: str, flow_run_id: uuid.UUID,
                              attempt: str) -> str | None:
        try:
            async for found in client.list(K8sJob, namespace=namespace,
                                           labels={FLOW_RUN_LABEL: str(flow_run_id)}):
                meta = as_dict(found).get("metadata") or {}
                if (meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) == attempt:
                    log.info("kubernetes.job_created_anyway", job=meta.get("name"))
                    return str(meta.get("name"))
        except CLUSTER_ERRORS as exc:
            log.warning("kubernetes.job_lookup_failed", error=api_error_text(exc))
        return None

    # -- waiting ----------------------------------------------------------------------------

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, KubernetesHandle)
        feed = self.feed(handle.cluster_config, handle.namespace, handle.pool_label)
        run_id = handle.flow_run_id
        watch = RunWatch(feed, handle.job_name, handle.limits,
                         note=lambda level, text: self.run_note(run_id, level, text))
        pump = OutputPump(
            PodLogs(feed.client, handle.namespace, watch.pod_name),
            stream_output=handle.stream_output, sink=handle.sink,
            tail_lines=self.settings.crash_log_lines,
            min_seconds=STREAM_MIN_SECONDS, max_seconds=STREAM_MAX_SECONDS,
            on_dropped=lambda size, why: self.output_dropped(run_id, size, why),
        )
        async with feed.waiting(handle.job_name) as entry, pump.following():
            ended = await watch.until_ended(entry)
        tail = await pump.finish(tail=ended.status_code != 0)
        if ended.never_started:
            await self._delete(handle, grace_seconds=0)
        feed.forget(handle.job_name)
        log.info("kubernetes.job_ended", flow_run_id=str(run_id), job=handle.job_name,
                 status_code=ended.status_code, reason=ended.explanation)
        return Exit(status_code=ended.status_code, explanation=ended.explanation,
                    output_tail=tail)

    # -- stopping and finding ---------------------------------------------------------------

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, KubernetesHandle)
        # The pod's own grace period unless [kubernetes] kill_grace_seconds says otherwise.
        grace = None if self.settings.kill_grace_seconds is None else int(grace_seconds)
        await self._delete(handle, grace)

    async def _delete(self, handle: KubernetesHandle, grace_seconds: int | None) -> None:
        """Delete the Job and, first, its pods (foreground propagation). Gone is not an error."""
        client = self.clusters.client(handle.cluster_config)
        try:
            await client.delete(K8sJob, handle.job_name, namespace=handle.namespace,
                                grace_period=grace_seconds, cascade=CascadeType.FOREGROUND)
        except ApiError as exc:
            if exc.status.code != 404:
                raise InfrastructureError(f"cannot delete Job {handle.job_name}: "
                                          f"{api_error_text(exc)}") from None
        except CLUSTER_ERRORS as exc:
            raise InfrastructureError(f"cannot delete Job {handle.job_name}: "
                                      f"{api_error_text(exc)}") from None
        log.info("kubernetes.job_deleted", job=handle.job_name, namespace=handle.namespace,
                 grace_seconds=grace_seconds)

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        parsed = parse_pid(infrastructure_pid)
        if parsed is None:
            log.info("kubernetes.not_ours", infrastructure_pid=infrastructure_pid,
                     reason="not <namespace>:<job name>")
            return None
        namespace, name = parsed
        client = self.clusters.client(None)
        try:
            found = await client.get(K8sJob, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise InfrastructureError(f"cannot read Job {name}: {api_error_text(exc)}") from None
        except CLUSTER_ERRORS as exc:
            raise InfrastructureError(f"cannot read Job {name}: {api_error_text(exc)}") from None
        return self._handle_of(as_dict(found), infrastructure_pid, flow_run_id)

    def _handle_of(self, found: dict[str, Any], pid: str,
                   flow_run_id: uuid.UUID) -> KubernetesHandle | None:
        meta = found.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(FLOW_RUN_LABEL) != str(flow_run_id):
            log.warning("kubernetes.not_ours", infrastructure_pid=pid,
                        reason=f"label {FLOW_RUN_LABEL} is {labels.get(FLOW_RUN_LABEL)!r}")
            return None
        annotations = meta.get("annotations") or {}
        pod_seconds = int(annotations.get(POD_TIMEOUT_ANNOTATION) or 60)
        job_seconds = annotations.get(JOB_TIMEOUT_ANNOTATION)
        age = _age_seconds(meta.get("creationTimestamp"))
        return KubernetesHandle(
            infrastructure_pid=pid, flow_run_id=flow_run_id,
            namespace=str(meta.get("namespace")), job_name=str(meta.get("name")),
            pool_label=str(labels.get(POOL_LABEL) or label_value("")),
            limits=WatchLimits(pod_seconds=pod_seconds,
                               job_seconds=int(job_seconds) if job_seconds else None,
                               started=time.monotonic() - age),
        )

    async def aclose(self) -> None:
        await self.clusters.aclose()


__all__ = ["Ended", "KubernetesBackend", "KubernetesHandle"]
