"""The Kubernetes backend's pure parts: cluster status to verdicts, the Job manifest, pids."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from flowhand.api.models import FlowRun, WorkPool
from flowhand.backends import load_backend
from flowhand.backends.base import Job
from flowhand.backends.kubernetes.manifest import (
    POD_TIMEOUT_ANNOTATION,
    SIGTERM_BEHAVIOR,
    job_manifest,
    label_key,
    label_value,
    parse_pid,
)
from flowhand.backends.kubernetes.podevents import pod_event
from flowhand.backends.kubernetes.settings import KubernetesJobConfig
from flowhand.backends.kubernetes.status import (
    Ended,
    Running,
    Waiting,
    create_refusal,
    read_verdict,
)
from flowhand.backends.kubernetes.watch import Feed
from flowhand.errors import JobConfigError
from flowhand.templating import render_job_configuration

JOB = "my-flow-abc12"


def job_obj(*conditions: dict[str, Any], active: int = 1) -> dict[str, Any]:
    """A batch/v1 Job as the apiserver returns it, with the given true conditions."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": JOB, "namespace": "default", "resourceVersion": "812",
                     "labels": {"prefect.io/flow-run-id": "5f0c3d7e-0000-4000-8000-000000000001"}},
        "spec": {"backoffLimit": 0, "completions": 1, "parallelism": 1},
        "status": {"active": active, "startTime": "2026-12-05T02:00:00Z",
                   "conditions": [{"type": c["type"], "status": "True",
                                   "reason": c.get("reason"), "message": c.get("message"),
                                   "lastTransitionTime": "2026-12-05T02:01:00Z"}
                                  for c in conditions]},
    }


def pod_obj(phase: str = "Running", *, state: dict[str, Any] | None = None,
            conditions: list[dict[str, Any]] | None = None, node: str | None = "kwok-node-0",
            reason: str | None = None, name: str = f"{JOB}-x7k2p",
            created: str = "2026-12-05T02:00:01Z") -> dict[str, Any]:
    """A v1 Pod made by the Job controller, as the apiserver returns it."""
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if reason:
        status["reason"] = reason
        status["message"] = "The node was low on resource: memory."
    if state is not None:
        status["containerStatuses"] = [{"name": "prefect-job", "image": "busybox",
                                        "imageID": "", "ready": False, "restartCount": 0,
                                        "state": state}]
    spec: dict[str, Any] = {"containers": [{"name": "prefect-job", "image": "busybox",
                                            "resources": {"limits": {"memory": "64Mi"}}}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": JOB, "job-name": JOB}},
            "spec": spec, "status": status}


def terminated(code: int, reason: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason,
                           "startedAt": "2026-12-05T02:00:02Z",
                           "finishedAt": "2026-12-05T02:00:09Z"}}


def test_complete_job_ends_with_zero():
    """A Complete Job whose container exited 0 ends with status 0 and no explanation."""
    verdict = read_verdict(job_obj({"type": "Complete"}, active=0),
                           [pod_obj("Succeeded", state=terminated(0, "Completed"))], JOB)
    assert verdict == Ended(0)


def test_failed_job_carries_exit_code():
    """A Job failed by BackoffLimitExceeded ends with the container's exit code and the reason."""
    verdict = read_verdict(
        job_obj({"type": "Failed", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}, active=0),
        [pod_obj("Failed", state=terminated(3, "Error"))], JOB)
    assert isinstance(verdict, Ended) and verdict.status_code == 3
    assert "BackoffLimitExceeded" in (verdict.explanation or "")
    assert "status 3" in (verdict.explanation or "")


def test_oom_killed_says_so_with_the_limit():
    """An OOMKilled container is named in the explanation with its memory limit."""
    verdict = read_verdict(job_obj({"type": "Failed", "reason": "BackoffLimitExceeded"}),
                           [pod_obj("Failed", state=terminated(137, "OOMKilled"))], JOB)
    assert isinstance(verdict, Ended) and verdict.status_code == 137
    assert "OOMKilled" in (verdict.explanation or "") and "64Mi" in (verdict.explanation or "")


def test_evicted_pod_reason_reaches_the_ending():
    """An evicted pod (DisruptionTarget, kept after its deletion) explains the Job's failure."""
    pod = pod_obj("Failed", conditions=[{"type": "DisruptionTarget", "status": "True",
                                         "reason": "EvictionByEvictionAPI",
                                         "message": "Eviction API: evicting"}])
    pod["metadata"]["deletionTimestamp"] = "2026-12-05T02:00:30Z"
    assert isinstance(read_verdict(job_obj(), [pod], JOB), Waiting)
    verdict = read_verdict(job_obj({"type": "Failed", "reason": "BackoffLimitExceeded"}),
                           [pod], JOB)
    assert isinstance(verdict, Ended) and "evicted" in (verdict.explanation or "")


def test_node_pressure_eviction_by_status_reason():
    """A pod the kubelet evicted (status reason Evicted) says so."""
    verdict = read_verdict(job_obj({"type": "Failed", "reason": "BackoffLimitExceeded"}),
                           [pod_obj("Failed", reason="Evicted")], JOB)
    assert isinstance(verdict, Ended) and "Evicted" in (verdict.explanation or "")


def test_deadline_exceeded():
    """activeDeadlineSeconds passing ends the run with DeadlineExceeded."""
    verdict = read_verdict(job_obj({"type": "Failed", "reason": "DeadlineExceeded",
                                    "message": "Job was active longer than specified deadline"}),
                           [pod_obj("Running", state={"running": {}})], JOB)
    assert isinstance(verdict, Ended) and "DeadlineExceeded" in (verdict.explanation or "")


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                    "CreateContainerConfigError"])
def test_never_starting_pods_end_at_once(reason):
    """Image and configuration errors end the run now and ask for the Job's deletion."""
    pod = pod_obj("Pending", state={"waiting": {"reason": reason, "message": "secret \"x\" "
                                                "not found"}})
    verdict = read_verdict(job_obj(), [pod], JOB)
    assert isinstance(verdict, Ended) and verdict.never_started
    assert reason in (verdict.explanation or "")


def test_unschedulable_pod_waits_with_the_schedulers_message():
    """A pod the scheduler cannot place waits (capacity) and quotes the scheduler."""
    message = "0/3 nodes are available: 3 Insufficient cpu."
    pod = pod_obj("Pending", node=None, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": message}])
    verdict = read_verdict(job_obj(), [pod], JOB)
    assert isinstance(verdict, Waiting) and verdict.capacity and message in verdict.why


def test_running_and_creating():
    """A running container is Running; a ContainerCreating one is waiting, not capacity."""
    assert read_verdict(job_obj(), [pod_obj(state={"running": {}})], JOB) == \
        Running(f"{JOB}-x7k2p")
    creating = read_verdict(job_obj(), [pod_obj("Pending", state={
        "waiting": {"reason": "ContainerCreating"}})], JOB)
    assert isinstance(creating, Waiting) and not creating.capacity


def test_vanished_job_is_an_ending():
    """A Job that is gone ends the run with that reason."""
    verdict = read_verdict(None, [], JOB)
    assert isinstance(verdict, Ended) and "vanished" in (verdict.explanation or "")
    assert verdict.status_code is None


def test_newest_pod_decides():
    """With retries, the newest pod is the one read."""
    old = pod_obj("Failed", state=terminated(1, "Error"), name=f"{JOB}-aaaaa",
                  created="2026-12-05T02:00:01Z")
    new = pod_obj("Running", state={"running": {}}, name=f"{JOB}-bbbbb",
                  created="2026-12-05T02:00:20Z")
    assert read_verdict(job_obj(), [new, old], JOB) == Running(f"{JOB}-bbbbb")


def event(reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event", "reason": reason, "message": message,
            "type": "Warning", "lastTimestamp": "2026-12-05T02:00:05Z",
            "involvedObject": {"kind": "Job", "name": JOB, "namespace": "default"}}


def test_quota_refusal_waits_and_admission_refusal_ends():
    """'exceeded quota' is room that may come; a LimitRange refusal never passes."""
    quota = create_refusal([event("FailedCreate", 'pods "x" is forbidden: exceeded quota: '
                                  "q, requested: pods=1, used: pods=1, limited: pods=1")])
    assert isinstance(quota, Waiting) and "exceeded quota" in quota.why
    limit = create_refusal([event("FailedCreate", 'pods "x" is forbidden: maximum memory '
                                  "usage per Container is 32Mi, but limit is 64Mi")])
    assert isinstance(limit, Ended) and limit.never_started and "32Mi" in (limit.explanation or "")
    assert create_refusal([event("SuccessfulCreate", "Created pod: x")]) is None


def test_feed_keeps_deleted_pods_and_drops_what_a_relist_lacks():
    """The watch cache keeps a deleted pod's last words and treats a re-list's gaps as deletions."""
    feed = Feed(client=None, namespace="default", selector={}, watch_timeout=60)  # type: ignore[arg-type]
    feed.waited.add(JOB)
    feed.apply("Job", "ADDED", job_obj())
    feed.apply("Pod", "ADDED", pod_obj())
    feed.apply("Pod", "DELETED", pod_obj("Failed", reason="Evicted"))
    entry = feed.jobs[JOB]
    assert entry.pods[f"{JOB}-x7k2p"]["metadata"]["deletionTimestamp"]
    feed.replace_all("Job", [])
    assert entry.job is None


def run_job(variables: dict[str, Any]) -> tuple[Job, KubernetesJobConfig]:
    """A Job as the worker builds it from Prefect's kubernetes template and `variables`."""
    template = json.loads(resources.files("flowhand").joinpath(
        "templates", "kubernetes.json").read_text())
    rendered = render_job_configuration(template, {"name": "My Flow!", **variables})
    cfg = KubernetesJobConfig.model_validate(rendered)
    now = datetime.now(UTC).isoformat()
    flow_run = FlowRun.model_validate({"id": str(uuid.uuid4()), "name": "calm-otter",
                                       "flow_id": str(uuid.uuid4()), "created": now})
    pool = WorkPool.model_validate({"id": str(uuid.uuid4()), "name": "k8s pool",
                                    "type": "kubernetes"})
    job = Job(flow_run=flow_run, flow_name="f", deployment=None, pool=pool, worker_name="w",
              config=cfg, env={"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
              labels={"prefect.io/flow-run-id": str(flow_run.id),
                      "prefect.io/work-pool-name": "k8s pool"},
              command="prefect flow-run execute", command_is_default=True)
    return job, cfg


def test_manifest_as_prefect_finishes_it():
    """The rendered template becomes Prefect's Job: env list, labels on Job and pod, args."""
    job, cfg = run_job({"namespace": "runs", "image": "busybox:1.36", "backoff_limit": 0,
                        "cpu_request": "100m", "annotations": {"team": "data"}})
    manifest = job_manifest(job, cfg)
    assert manifest["metadata"]["namespace"] == "runs"
    assert manifest["metadata"]["generateName"] == "my-flow-"
    assert manifest["metadata"]["labels"]["prefect.io/work-pool-name"] == "k8s-pool"
    assert manifest["spec"]["template"]["metadata"]["labels"] == manifest["metadata"]["labels"]
    assert manifest["metadata"]["annotations"]["team"] == "data"
    assert manifest["metadata"]["annotations"][POD_TIMEOUT_ANNOTATION] == "60"
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["image"] == "busybox:1.36"
    assert container["resources"]["requests"] == {"cpu": "100m"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[SIGTERM_BEHAVIOR] == "reschedule"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_manifest_retries_relinquish_and_bad_manifest():
    """backoffLimit above 0 makes SIGTERM relinquish; a manifest without a container is refused."""
    job, cfg = run_job({"backoff_limit": 2})
    env = job_manifest(job, cfg)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": SIGTERM_BEHAVIOR, "value": "relinquish"} in env
    broken = copy.deepcopy(cfg.job_manifest)
    broken["spec"]["template"]["spec"]["containers"] = []
    with pytest.raises(JobConfigError, match="containers"):
        job_manifest(job, cfg.model_copy(update={"job_manifest": broken}))


def test_labels_and_pids():
    """Label keys and values are made valid as Prefect does; pids in both Prefect formats."""
    assert label_value("my pool/äx ") == "my-pool-ax"
    assert label_key("prefect.io/flow name") == "prefect.io/flow-name"
    assert parse_pid("default:my-job-x1") == ("default", "my-job-x1")
    assert parse_pid("uid:ns:job") == ("ns", "job")
    assert parse_pid("nocolon") is None


def test_backend_registered_with_prefects_template():
    """`kubernetes` loads and its default template is Prefect's kubernetes template."""
    cls = load_backend("kubernetes")
    assert cls.pool_type == "kubernetes"
    template = cls.default_base_job_template()
    assert "pod_watch_timeout_seconds" in template["variables"]["properties"]
    assert template["job_configuration"]["job_manifest"]["kind"] == "Job"
    reference = Path(__file__).parents[3] / "shared/reference/prefect-kubernetes-job-template.json"
    if reference.exists():  # the reference read from prefect-kubernetes 0.8.0
        assert template == json.loads(reference.read_text())


def test_pod_events_as_prefects_observer_names_them():
    """A pod's phase becomes `prefect.kubernetes.pod.<phase>` on the pod's resource, related to
    the run by its labels; an evicted pod is `evicted`; the id is stable per pod and phase."""
    pod = pod_obj("Failed", reason="Evicted", state=terminated(137, "Error"))
    pod["metadata"]["uid"] = "0d4c-uid"
    pod["metadata"]["labels"].update({"prefect.io/flow-run-id": "r1",
                                      "prefect.io/flow-run-name": "calm-otter",
                                      "prefect.io/worker-name": "My Worker"})
    event = pod_event(pod)
    assert event is not None and event.name == "prefect.kubernetes.pod.evicted"
    assert event.resource["prefect.resource.id"] == "prefect.kubernetes.pod.0d4c-uid"
    assert event.resource["kubernetes.reason"] == "Evicted"
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in event.related}
    assert roles == {"flow-run": "prefect.flow-run.r1",
                     "worker": "prefect.worker.kubernetes.my-worker"}
    assert pod_event(pod) == event
    running = pod_obj("Running", state={"running": {}})
    running["metadata"]["uid"] = "0d4c-uid"
    assert pod_event(running).name == "prefect.kubernetes.pod.running"
