"""Prefect's kubernetes pod events (`prefect.kubernetes.pod.<phase>`), as its observer emits them.

The resource is the pod (`prefect.kubernetes.pod.<uid>`, its name and namespace); the related
resources are read from the pod's Prefect labels (flow run, deployment, flow, work pool, worker).
A failed pod whose container has a termination reason is `evicted`, as the observer calls it.
One event per pod and phase: the id is derived from both, so a replay is deduplicated.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.slugs import slugify

Resource = dict[str, str]

_RELATED = (
    ("prefect.io/flow-run-id", "prefect.io/flow-run-name", "flow-run"),
    ("prefect.io/deployment-id", "prefect.io/deployment-name", "deployment"),
    ("prefect.io/flow-id", "prefect.io/flow-name", "flow"),
    ("prefect.io/work-pool-id", "prefect.io/work-pool-name", "work-pool"),
)


@dataclass(frozen=True)
class PodEvent:
    name: str
    resource: Resource
    related: list[Resource]
    id: str


def related_from_labels(labels: Mapping[str, str]) -> list[Resource]:
    related: list[Resource] = []
    for id_key, name_key, role in _RELATED:
        if labels.get(id_key):
            related.append({"prefect.resource.id": f"prefect.{role}.{labels[id_key]}",
                            "prefect.resource.role": role,
                            "prefect.resource.name": str(labels.get(name_key) or "")})
    worker = labels.get("prefect.io/worker-name")
    if worker:
        related.append({"prefect.resource.id": f"prefect.worker.kubernetes.{slugify(worker)}",
                        "prefect.resource.role": "worker", "prefect.resource.name": worker,
                        "prefect.worker-type": "kubernetes",
                        "prefect.version": PREFECT_COMPAT_VERSION})
    return related


def pod_phase(pod: Mapping[str, Any]) -> str | None:
    status = pod.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        for container in status.get("containerStatuses") or []:
            if ((container.get("state") or {}).get("terminated") or {}).get("reason"):
                return "evicted" if status.get("reason") == "Evicted" else "failed"
    return str(phase) if phase else None


def pod_event(pod: Mapping[str, Any]) -> PodEvent | None:
    """The event for the pod's current phase, or None when it has none yet."""
    meta = pod.get("metadata") or {}
    phase = pod_phase(pod)
    uid = meta.get("uid")
    if phase is None or not uid:
        return None
    resource = {"prefect.resource.id": f"prefect.kubernetes.pod.{uid}",
                "prefect.resource.name": str(meta.get("name")),
                "kubernetes.namespace": str(meta.get("namespace"))}
    if phase == "evicted":
        resource["kubernetes.reason"] = str((pod.get("status") or {}).get("reason"))
    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{uid}/{phase.lower()}"))
    return PodEvent(f"prefect.kubernetes.pod.{phase.lower()}", resource,
                    related_from_labels(meta.get("labels") or {}), event_id)
