"""What the cluster says about one run, read into a verdict: still waiting, running, or ended.

Pure functions over the API's JSON (a Job, the pods it made, the Job's events), so every case a
kubelet, the scheduler or the Job controller can report is tested without a cluster. The Job's
conditions decide an ending (the Job controller owns retries and deadlines); the pods say why,
and whether a pod that has not started ever can.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Container waiting reasons after which the pod can never start by itself: the run is CRASHED
#: at once and its Job deleted, so it cannot start later (Prefect leaves such Jobs behind).
NEVER_STARTS = {
    "ErrImagePull": "the image could not be pulled",
    "ImagePullBackOff": "the image could not be pulled",
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and imagePullPolicy is Never",
    "CreateContainerConfigError": "the container's configuration refers to something missing "
    "(a secret or config map)",
}
#: Pod DisruptionTarget reasons, in a user's words.
DISRUPTIONS = {
    "EvictionByEvictionAPI": "evicted (Eviction API)",
    "PreemptionByScheduler": "preempted by the scheduler for a higher-priority pod",
    "DeletionByTaintManager": "deleted by the taint manager (its node became unusable)",
    "DeletionByPodGC": "garbage-collected (its node is gone)",
    "TerminationByKubelet": "terminated by the kubelet (node pressure)",
}

#: Pod status reasons of a pod its node stopped or refused.
POD_FAILURES = {"Evicted", "Preempting", "OutOfmemory", "OutOfcpu", "NodeLost", "Shutdown",
                "Terminated", "NodeAffinity", "UnexpectedAdmissionError"}


@dataclass(frozen=True)
class Waiting:
    """The pod has not started yet. `why` is said once in the run's logs; `capacity` is True
    when only room is missing (a node, a quota), which may come: the run keeps waiting."""

    why: str
    capacity: bool = True


@dataclass(frozen=True)
class Running:
    """The run's container has started."""

    pod_name: str


@dataclass(frozen=True)
class Ended:
    """The Job is over, or can never run. `status_code` is the container's exit code when one
    is known; `never_started` asks for the Job to be deleted."""

    status_code: int | None
    explanation: str | None = None
    never_started: bool = False


Verdict = Waiting | Running | Ended


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """True conditions by type."""
    found = {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if str(cond.get("status")) == "True":
            found[str(cond.get("type"))] = cond
    return found


def _container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The status of the run's container (`prefect-job`, else the first)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == "prefect-job":
            return dict(status)
    return dict(statuses[0]) if statuses else {}


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    state = _container(pod).get("state") or {}
    return state.get("terminated") or (_container(pod).get("lastState") or {}).get("terminated")


def latest_pod(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The Job's newest pod (a Job with retries makes several)."""
    ordered = sorted(pods, key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp")
                                          or "", (p.get("metadata") or {}).get("name") or ""))
    return ordered[-1] if ordered else None


def pod_failure(pod: Mapping[str, Any]) -> str | None:
    """Why a pod stopped or was stopped, in a user's words, when the pod says so."""
    status = pod.get("status") or {}
    disruption = _conditions(pod).get("DisruptionTarget")
    if disruption is not None:
        reason = str(disruption.get("reason") or "")
        what = DISRUPTIONS.get(reason, reason or "disrupted")
        message = disruption.get("message")
        return f"The pod was {what}" + (f": {message}" if message else ".")
    if status.get("reason") in POD_FAILURES:
        message = status.get("message")
        return f"The pod failed: {status['reason']}" + (f": {message}" if message else ".")
    terminated = _terminated(pod)
    if terminated is not None:
        reason = str(terminated.get("reason") or "")
        if reason == "OOMKilled":
            limit = _memory_limit(pod)
            return ("The container was OOMKilled: it ran out of memory"
                    + (f" (memory limit {limit})." if limit else "."))
        if reason not in ("", "Completed", "Error"):
            message = terminated.get("message")
            return f"The container ended: {reason}" + (f": {message}" if message else ".")
    return None


def _memory_limit(pod: Mapping[str, Any]) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") in ("prefect-job", None) or len(
                (pod.get("spec") or {}).get("containers") or []) == 1:
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit else None
    return None


def exit_code(pod: Mapping[str, Any] | None) -> int | None:
    if pod is None:
        return None
    terminated = _terminated(pod)
    code = terminated.get("exitCode") if terminated else None
    return int(code) if code is not None else None


def job_ended(job: Mapping[str, Any], pod: Mapping[str, Any] | None) -> Ended | None:
    """The Job controller's conclusion, with the pod's reasons; None while it has none."""
    conditions = _conditions(job)
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        code = exit_code(pod)
        return Ended(0 if code is None else code)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is None:
        return None
    reason = str(failed.get("reason") or "Failed")
    parts = [f"The Job failed: {reason}"
             + (f" ({failed['message']})" if failed.get("message") else "") + "."]
    if pod is not None:
        why = pod_failure(pod)
        if why:
            parts.append(why)
    code = exit_code(pod)
    if code is not None and (pod_failure(pod or {}) is None or "OOMKilled" not in parts[-1]):
        parts.append(f"The container exited with status {code}.")
    return Ended(code, " ".join(parts))


def pod_waiting(pod: Mapping[str, Any]) -> Verdict | None:
    """A verdict for a pod that has not started; None when it has."""
    status = pod.get("status") or {}
    container = _container(pod)
    waiting = (container.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in NEVER_STARTS:
        message = waiting.get("message")
        return Ended(None, f"The pod cannot start: {reason}: {NEVER_STARTS[reason]}"
                     + (f" ({message})." if message else "."), never_started=True)
    if status.get("phase") not in (None, "Pending"):
        return None
    scheduled = _conditions_all(pod).get("PodScheduled")
    if scheduled is not None and str(scheduled.get("status")) == "False":
        message = scheduled.get("message") or scheduled.get("reason") or "no node fits"
        return Waiting(f"The pod is waiting for a node ({scheduled.get('reason') or 'pending'}):"
                       f" {message}")
    if reason:
        return Waiting(f"The pod is starting ({reason})", capacity=False)
    if not (pod.get("spec") or {}).get("nodeName"):
        return Waiting("The pod is waiting to be scheduled.")
    return Waiting("The pod is starting.", capacity=False)


def _conditions_all(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or []}


def create_refusal(events: Iterable[Mapping[str, Any]]) -> Verdict | None:
    """The Job controller's newest FailedCreate event, when it could not make the pod: a quota
    is room that may come (wait); an admission refusal (a LimitRange) never passes."""
    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    newest = max(refused, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    message = str(newest.get("message") or "")
    if "exceeded quota" in message:
        return Waiting(f"The pod cannot be created yet: {message}")
    return Ended(None, f"The pod was refused: {message}", never_started=True)


def read_verdict(
    job: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    job_name: str,
) -> Verdict:
    """What the Job and its pods say now. A vanished Job is an ending (CRASHED by the worker)."""
    pod = latest_pod(pods)
    if job is None:
        why = pod_failure(pod) if pod is not None else None
        return Ended(exit_code(pod), f"The Job {job_name} vanished: it was deleted by someone "
                     "else or with its namespace." + (f" {why}" if why else ""))
    ended = job_ended(job, pod)
    if ended is not None:
        return ended
    if pod is None:
        return Waiting("The Job has not created its pod yet.", capacity=False)
    if (pod.get("metadata") or {}).get("deletionTimestamp") or \
            (pod.get("status") or {}).get("phase") == "Failed":
        # The Job controller decides: a retry (backoffLimit) or the Job's failure.
        return Waiting("The pod ended; waiting for the Job controller "
                       f"({pod_failure(pod) or 'no reason given'})", capacity=False)
    started = pod_waiting(pod)
    if started is not None:
        return started
    return Running(str((pod.get("metadata") or {}).get("name")))
