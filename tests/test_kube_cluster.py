"""The Kubernetes test cluster itself: a real control plane, kwok nodes and the local node."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kube_cluster import (
    SCRIPT,
    Kube,
    KubeCluster,
    create_limit_range,
    create_resource_quota,
    evict,
    local_node_log,
    terminate_container,
    wait_container,
    wait_for,
)

pytestmark = pytest.mark.kubernetes


def job(name: str, command: list[str], *, node: str | None = None, image: str = "busybox:1",
        env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": image, "args": command, "env": env or []}],
    }
    if node:
        pod_spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}}}


def job_pod(kube: Kube, namespace: str, name: str, phase: str = "Running") -> dict[str, Any]:
    """The Job's pod once it reaches `phase`."""
    def found() -> dict[str, Any] | None:
        pods = kube.pods(namespace, f"job-name={name}")
        return next((p for p in pods if p.get("status", {}).get("phase") == phase), None)

    return dict(wait_for(f"job {name}'s pod {phase}", found, timeout=60))


def job_condition(kube: Kube, namespace: str, name: str, kind: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        status = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")["status"]
        return next((c for c in status.get("conditions") or []
                     if c["type"] == kind and c["status"] == "True"), None)

    return dict(wait_for(f"job {name} {kind}", found, timeout=60))


def create_job(kube: Kube, namespace: str, body: dict[str, Any]) -> None:
    kube.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", body)


def test_job_pod_scheduled_on_kwok_node_stays_running(
        kube: Kube, kube_namespace: str, kwok_node: Callable[..., str]) -> None:
    """A Job's pod is made by the Job controller, scheduled onto a kwok node, and stays Running."""
    node = kwok_node()
    create_job(kube, kube_namespace, job("sleeper", ["sleep", "3600"]))
    pod = job_pod(kube, kube_namespace, "sleeper")
    assert pod["spec"]["nodeName"] == node
    time.sleep(3)
    pod = kube.pod(kube_namespace, pod["metadata"]["name"])
    assert pod["status"]["phase"] == "Running"
    assert "running" in pod["status"]["containerStatuses"][0]["state"]


@pytest.mark.parametrize(("code", "reason", "outcome"), [
    (3, None, "Failed"), (0, None, "Complete"), (137, "OOMKilled", "Failed")])
def test_patched_termination_sticks_and_ends_the_job(
        kube: Kube, kube_namespace: str, kwok_node: Callable[..., str],
        code: int, reason: str | None, outcome: str) -> None:
    """A container terminated as a kubelet reports it stays so (kwok leaves it) and the Job
    controller ends the Job accordingly."""
    kwok_node()
    create_job(kube, kube_namespace, job("ends", ["sleep", "3600"]))
    name = job_pod(kube, kube_namespace, "ends")["metadata"]["name"]
    terminate_container(kube, kube_namespace, name, code, reason=reason)
    condition = job_condition(kube, kube_namespace, "ends", outcome)
    if outcome == "Failed":
        assert condition["reason"] == "BackoffLimitExceeded"
    time.sleep(2)
    state = kube.pod(kube_namespace, name)["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == code
    assert state["terminated"]["reason"] == (reason or ("Completed" if code == 0 else "Error"))


def test_hold_node_keeps_pod_pending_for_a_pull_failure(
        kube: Kube, kube_namespace: str, kwok_node: Callable[..., str]) -> None:
    """On a hold node kwok never starts the pod, so an ImagePullBackOff reported by the test
    stays as it was reported."""
    kwok_node(hold=True)
    create_job(kube, kube_namespace, job("pull", ["true"], image="nowhere/missing:1"))
    pod = wait_for("the pod scheduled", lambda: next(
        (p for p in kube.pods(kube_namespace, "job-name=pull")
         if p["spec"].get("nodeName")), None))
    name = pod["metadata"]["name"]
    wait_container(kube, kube_namespace, name, "ImagePullBackOff", "Back-off pulling image")
    time.sleep(3)
    status = kube.pod(kube_namespace, name)["status"]
    assert status["phase"] == "Pending"
    assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"


def test_eviction_api_removes_the_pod(
        kube: Kube, kube_namespace: str, kwok_node: Callable[..., str]) -> None:
    """An eviction through the Eviction API deletes the pod (kwok finishes the delete)."""
    kwok_node()
    create_job(kube, kube_namespace, job("evicted", ["sleep", "3600"]))
    name = job_pod(kube, kube_namespace, "evicted")["metadata"]["name"]
    assert evict(kube, kube_namespace, name).status_code == 201
    wait_for("the evicted pod gone", lambda: kube.find(
        f"/api/v1/namespaces/{kube_namespace}/pods/{name}") is None, timeout=30)


def test_quota_and_limit_range_refuse_creates(kube: Kube, kube_namespace: str) -> None:
    """A ResourceQuota and a LimitRange refuse a pod at admission, with the reason."""
    pod = {"metadata": {"name": "big"}, "spec": {"containers": [{
        "name": "main", "image": "busybox:1",
        "resources": {"limits": {"memory": "128Mi", "cpu": "1"}}}]}}
    path = f"/api/v1/namespaces/{kube_namespace}/pods"
    create_limit_range(kube, kube_namespace, [{"type": "Container", "max": {"memory": "64Mi"}}])
    refused = kube.try_create(path, pod)
    assert refused.status_code == 403
    assert "maximum memory usage per Container is 64Mi" in refused.json()["message"]
    kube.delete(f"/api/v1/namespaces/{kube_namespace}/limitranges/limits")
    create_resource_quota(kube, kube_namespace, {"pods": "0"})
    refused = wait_for("the quota enforced", lambda: (
        r := kube.try_create(path, pod)).status_code == 403 and r)
    assert "exceeded quota" in refused.json()["message"]


def test_local_node_runs_the_command_and_reports_its_exit_code(
        kube: Kube, kube_namespace: str, local_node: Callable[..., str],
        tmp_path: Path) -> None:
    """The local node runs a pod's command for real, with its env, and reports its exit code."""
    node = local_node()
    kube.create(f"/api/v1/namespaces/{kube_namespace}/configmaps",
                {"metadata": {"name": "cfg"}, "data": {"word": "from-configmap"}})
    env: list[dict[str, Any]] = [{"name": "GREETING", "value": "hello"},
                                 {"name": "WORD", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "word"}}},
                                 {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    create_job(kube, kube_namespace, job(
        "real", ["sh", "-c", 'echo "$GREETING $WORD $POD"; exit 7'], node=node, env=env))
    pod = job_pod(kube, kube_namespace, "real", phase="Failed")
    status = pod["status"]["containerStatuses"][0]
    assert status["state"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["reason"] == "Error"
    assert status["containerID"].startswith("local-process://")
    name = pod["metadata"]["name"]
    output = local_node_log(tmp_path, node, kube_namespace, name, "main").read_text()
    assert output.strip() == f"hello from-configmap {name}"
    served = kube.request("GET", f"/api/v1/namespaces/{kube_namespace}/pods/{name}/log")
    assert served.text == output
    job_condition(kube, kube_namespace, "real", "Failed")


def test_local_node_missing_secret_then_deletion(
        kube: Kube, kube_namespace: str, local_node: Callable[..., str]) -> None:
    """A missing secret is CreateContainerConfigError; a running pod's deletion SIGTERMs its
    process (exit 143) and finishes the delete."""
    node = local_node()
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "t"}}}]
    create_job(kube, kube_namespace, job("nosecret", ["sleep", "600"], node=node, env=env))
    waiting = wait_for("CreateContainerConfigError", lambda: next(
        (p for p in kube.pods(kube_namespace, "job-name=nosecret")
         if (p["status"].get("containerStatuses") or [{}])[0].get("state", {})
         .get("waiting", {}).get("reason") == "CreateContainerConfigError"), None))
    assert 'secret "absent" not found' in (
        waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"])
    kube.create(f"/api/v1/namespaces/{kube_namespace}/secrets",
                {"metadata": {"name": "absent"}, "stringData": {"t": "x"}})
    name = job_pod(kube, kube_namespace, "nosecret")["metadata"]["name"]
    kube.delete(f"/api/v1/namespaces/{kube_namespace}/pods/{name}", gracePeriodSeconds=5)
    wait_for("the pod deleted", lambda: kube.find(
        f"/api/v1/namespaces/{kube_namespace}/pods/{name}") is None, timeout=30)


def test_up_twice_reuses_the_running_cluster(kube_cluster: KubeCluster) -> None:
    """A second `up` finds the running cluster and prints the same KUBECONFIG line at once."""
    started = time.monotonic()
    done = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=60,
                          check=True)
    assert time.monotonic() - started < 5
    assert done.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={kube_cluster.kubeconfig}"
