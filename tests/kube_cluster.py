"""A real Kubernetes control plane for the tests: fixtures and helpers (no mock anywhere).

`scripts/kube-test-cluster up` builds (or reuses) etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok and starts them on loopback; this module calls it once per session and
gives the tests an admin client. Nodes are the tests' to make: kwok nodes (`make_kwok_node`) whose
pods become Running and stay so until a test reports what a kubelet would (`terminate_container`,
`wait_container`, `evicted_by_kubelet`), or a local node that really runs the pods' commands
(`tests.kube_node`, the `local_node` fixture).

Import the fixtures in a test module with `from tests.kube_cluster import *` or by name; mark
the tests `pytest.mark.kubernetes`.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "kube-test-cluster"
KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
TEST_NODE_LABEL = "flowhand.test/node"
HOLD_PREFIX = "kwok-hold-"  # kwok leaves pods on these nodes Pending (an image pull in progress)

__all__ = [
    "Kube", "KubeCluster", "kube", "kube_cluster", "kube_namespace", "kwok_node",
    "make_kwok_node", "delete_node", "terminate_container", "wait_container",
    "evicted_by_kubelet", "evict", "create_resource_quota", "create_limit_range", "wait_for",
    "now_rfc3339", "require_kubernetes", "local_node", "local_node_log", "node_ready",
]


def require_kubernetes(reason: str) -> None:
    """Skip with one line when the cluster cannot be had here; fail instead in CI."""
    if kubernetes_required():
        pytest.fail(f"Kubernetes test cluster required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Kubernetes test cluster: {reason}")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30,
             interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Kube:
    """A small admin client of the test cluster's kube-apiserver (JSON over httpx)."""

    def __init__(self, cluster_dir: Path) -> None:
        pki = cluster_dir / "pki"
        ports = dict(line.split("=", 1) for line in
                     (cluster_dir / "ports.env").read_text().split())
        self.server = f"https://127.0.0.1:{ports['APISERVER_PORT']}"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.http = httpx.Client(base_url=self.server, verify=context, timeout=30)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (),
                **kw: Any) -> httpx.Response:
        response = self.http.request(method, path, **kw)
        if response.status_code >= 400 and response.status_code not in ok:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def find(self, path: str) -> dict[str, Any] | None:
        """GET, None when the object does not exist."""
        response = self.request("GET", path, ok=(404,))
        return None if response.status_code == 404 else response.json()

    def create(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body).json()

    def try_create(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST and return the response whatever it says (for refusals a test expects)."""
        return self.http.post(path, json=body)

    def patch(self, path: str, body: dict[str, Any], *, merge: bool = True) -> Any:
        kind = "merge-patch" if merge else "strategic-merge-patch"
        return self.request("PATCH", path, content=_json(body),
                            headers={"Content-Type": f"application/{kind}+json"}).json()

    def delete(self, path: str, **body: Any) -> None:
        self.request("DELETE", path, ok=(404,), json=body or None)

    def items(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return list(self.get(path, **params)["items"])

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else {}
        return self.items(f"/api/v1/namespaces/{namespace}/pods", **params)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))

    def patch_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        return self.patch(f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                          {"status": status})


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


@dataclass
class KubeCluster:
    kubeconfig: Path
    directory: Path

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG for a subprocess (a worker) that talks to the cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}


def kubernetes_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("FLOWHAND_REQUIRE_KUBERNETES") == "1"


def unavailable_reason() -> str | None:
    """Why the cluster cannot be had on this machine at all, or None."""
    if shutil.which("go") is None and not _binaries_cached():
        return "Go is not installed (it builds the control plane's binaries)"
    return None


def start_cluster() -> KubeCluster:
    """Run `scripts/kube-test-cluster up` (reusing a running cluster); skip/fail when it can't."""
    reason = unavailable_reason()
    if reason:
        require_kubernetes(reason)
    done = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=3600)
    last = done.stdout.strip().splitlines()[-1:] or [""]
    if done.returncode != 0 or not last[0].startswith("export KUBECONFIG="):
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        require_kubernetes(f"scripts/kube-test-cluster up failed: {tail}")
    kubeconfig = Path(last[0].split("=", 1)[1])
    return KubeCluster(kubeconfig, kubeconfig.parent)


def _binaries_cached() -> bool:
    done = subprocess.run(["bash", "-c", f'source "{SCRIPT}"; [ -x "$BIN/kube-apiserver" ]'],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture(scope="session")
def kube_cluster() -> KubeCluster:
    """The running test cluster (started, or reused, by scripts/kube-test-cluster up)."""
    return start_cluster()


@pytest.fixture(scope="session")
def kube(kube_cluster: KubeCluster) -> Iterator[Kube]:
    """An admin client of the test cluster."""
    client = Kube(kube_cluster.directory)
    yield client
    client.close()


@pytest.fixture
def kube_namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace (with its default service account ready), deleted after the test."""
    name = f"ft-{uuid.uuid4().hex[:10]}"
    kube.create("/api/v1/namespaces", {"metadata": {"name": name,
                                                    "labels": {"flowhand.test/ns": "1"}}})
    wait_for(f"the default service account in {name}", lambda: kube.find(
        f"/api/v1/namespaces/{name}/serviceaccounts/default"))
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def kwok_node(kube: Kube) -> Iterator[Callable[..., str]]:
    """make(name=None, labels=None, taints=None, hold=False) -> a kwok node's name; all the
    nodes made are deleted after the test."""
    made: list[str] = []

    def make(name: str | None = None, **kw: Any) -> str:
        made.append(make_kwok_node(kube, name, **kw))
        return made[-1]

    yield make
    for name in made:
        delete_node(kube, name)


def make_kwok_node(kube: Kube, name: str | None = None, *,
                   labels: dict[str, str] | None = None,
                   taints: list[dict[str, str]] | None = None,
                   hold: bool = False, ready_timeout: float = 30) -> str:
    """Create a node that kwok runs (Ready within seconds) and return its name.

    hold=True names it kwok-hold-*: kwok then leaves its pods Pending, as a kubelet still
    pulling the image would, for `wait_container` to report a pull or config failure."""
    name = name or f"{HOLD_PREFIX if hold else 'kwok-'}{uuid.uuid4().hex[:8]}"
    kube.create("/api/v1/nodes", {
        "metadata": {"name": name, "annotations": KWOK_ANNOTATION,
                     "labels": {"type": "kwok", TEST_NODE_LABEL: "kwok",
                                "kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"taints": taints or []},
    })
    wait_for(f"node {name} Ready", lambda: node_ready(kube, name), timeout=ready_timeout)
    return name


def node_ready(kube: Kube, name: str) -> bool:
    node = kube.find(f"/api/v1/nodes/{name}")
    conditions = (node or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def delete_node(kube: Kube, name: str) -> None:
    """Delete a node (as a lost machine or a scale-down would); its pods are then the
    control plane's to garbage-collect."""
    kube.delete(f"/api/v1/nodes/{name}")


def _container_statuses(pod: dict[str, Any], state: dict[str, Any],
                        container: str | None, ready: bool) -> list[dict[str, Any]]:
    statuses = []
    for spec in pod["spec"]["containers"]:
        old: dict[str, Any] = next((s for s in pod.get("status", {}).get("containerStatuses") or []
                    if s["name"] == spec["name"]), {})
        mine = container is None or spec["name"] == container
        statuses.append({
            "name": spec["name"], "image": spec["image"],
            "imageID": old.get("imageID", spec["image"]),
            "containerID": old.get("containerID", f"kwok://{spec['name']}"),
            "restartCount": old.get("restartCount", 0),
            "ready": ready if mine else old.get("ready", False),
            "started": "running" in state if mine else old.get("started", False),
            "state": state if mine else old.get("state", {"waiting": {}}),
        })
    return statuses


def _conditions(ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
    now = now_rfc3339()
    status = "True" if ready else "False"
    result = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
              {"type": "Initialized", "status": "True", "lastTransitionTime": now}]
    for kind in ("ContainersReady", "Ready"):
        entry: dict[str, Any] = {"type": kind, "status": status, "lastTransitionTime": now}
        if reason and not ready:
            entry["reason"] = reason
        result.append(entry)
    return result


def terminate_container(kube: Kube, namespace: str, pod_name: str, exit_code: int, *,
                        reason: str | None = None, message: str = "",
                        container: str | None = None) -> dict[str, Any]:
    """Report the pod's container(s) terminated as a kubelet does (restartPolicy Never): exit
    code, reason (Completed/Error by default, or e.g. OOMKilled), phase Succeeded/Failed."""
    pod = kube.pod(namespace, pod_name)
    now = now_rfc3339()
    started = (pod.get("status", {}).get("startTime")) or now
    terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0
                                                              else "Error"),
                  "startedAt": started, "finishedAt": now}
    if message:
        terminated["message"] = message
    statuses = _container_statuses(pod, {"terminated": terminated}, container, ready=False)
    codes = [s["state"].get("terminated", {}).get("exitCode") for s in statuses]
    phase = pod["status"].get("phase", "Running")
    if all(code is not None for code in codes):
        phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
    return dict(kube.patch_pod_status(namespace, pod_name, {
        "phase": phase, "containerStatuses": statuses,
        "conditions": _conditions(False, "PodCompleted" if phase != "Running" else None)}))


def wait_container(kube: Kube, namespace: str, pod_name: str, reason: str, message: str = "",
                   container: str | None = None) -> dict[str, Any]:
    """Report a container waiting as a kubelet does: ErrImagePull, ImagePullBackOff,
    CreateContainerConfigError (a missing secret or config map), ... The pod stays Pending;
    use a hold node (make_kwok_node(hold=True)) so kwok never started it."""
    pod = kube.pod(namespace, pod_name)
    waiting = {"reason": reason, "message": message or f"{reason} (reported by the test)"}
    statuses = _container_statuses(pod, {"waiting": waiting}, container, ready=False)
    return dict(kube.patch_pod_status(namespace, pod_name, {
        "phase": "Pending", "containerStatuses": statuses,
        "conditions": _conditions(False, "ContainersNotReady")}))


def evicted_by_kubelet(kube: Kube, namespace: str, pod_name: str,
                       message: str = "The node was low on resource: memory.") -> dict[str, Any]:
    """Report the pod evicted by its node's kubelet (node pressure): phase Failed, reason
    Evicted, the DisruptionTarget condition, containers killed (137)."""
    pod = kube.pod(namespace, pod_name)
    now = now_rfc3339()
    terminated = {"exitCode": 137, "reason": "Error", "finishedAt": now,
                  "startedAt": pod["status"].get("startTime") or now}
    conditions = [*_conditions(False, "PodFailed"),
                  {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                   "message": message, "lastTransitionTime": now}]
    return dict(kube.patch_pod_status(namespace, pod_name, {
        "phase": "Failed", "reason": "Evicted", "message": message, "conditions": conditions,
        "containerStatuses": _container_statuses(pod, {"terminated": terminated}, None, False)}))


def evict(kube: Kube, namespace: str, pod_name: str) -> httpx.Response:
    """Evict the pod through the Eviction API (as `kubectl drain` or the autoscaler does)."""
    return kube.http.post(f"/api/v1/namespaces/{namespace}/pods/{pod_name}/eviction", json={
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod_name, "namespace": namespace}})


def create_resource_quota(kube: Kube, namespace: str, hard: dict[str, str],
                          name: str = "quota") -> dict[str, Any]:
    """A ResourceQuota (e.g. {"pods": "0"} or {"limits.memory": "1Mi"}), its usage computed by
    the controller-manager before this returns, so admission enforces it at once."""
    quota = kube.create(f"/api/v1/namespaces/{namespace}/resourcequotas",
                        {"metadata": {"name": name}, "spec": {"hard": hard}})
    path = f"/api/v1/namespaces/{namespace}/resourcequotas/{name}"
    wait_for(f"quota {name} counted", lambda: (kube.find(path) or {}).get("status", {})
             .get("used") is not None)
    return dict(quota)


def create_limit_range(kube: Kube, namespace: str, limits: list[dict[str, Any]],
                       name: str = "limits") -> dict[str, Any]:
    """A LimitRange, e.g. [{"type": "Container", "max": {"memory": "64Mi"}}]: a pod asking
    more is refused at admission (no webhook needed)."""
    return dict(kube.create(f"/api/v1/namespaces/{namespace}/limitranges",
                            {"metadata": {"name": name}, "spec": {"limits": limits}}))


def local_node_images() -> dict[str, str]:
    """Image -> local environment's bin for the local node: the Prefect test image runs in the
    Prefect tool environment (so `prefect flow-run execute` and `python -m prefect.engine`
    work), busybox-like commands run as they are."""
    from tests.prefect_env import PREFECT_ENV

    return {"flowhand-test/prefect": str(PREFECT_ENV / "bin")}


@pytest.fixture
def local_node(kube: Kube, kube_cluster: KubeCluster,
               tmp_path: Path) -> Iterator[Callable[..., str]]:
    """start(name=None, labels=None, taints=None, images=None) -> the name of a node whose pods
    really run as local processes (tests.kube_node); stopped and deleted after the test."""
    started: list[tuple[str, subprocess.Popen[bytes], BinaryIO]] = []

    def start(name: str | None = None, *, labels: dict[str, str] | None = None,
              taints: list[str] | None = None, images: dict[str, str] | None = None) -> str:
        name = name or f"local-{uuid.uuid4().hex[:8]}"
        state = tmp_path / f"node-{name}"
        argv = [sys.executable, "-m", "tests.kube_node", "--cluster-dir",
                str(kube_cluster.directory), "--node", name, "--state", str(state)]
        for image, bin_dir in {**local_node_images(), **(images or {})}.items():
            argv += ["--image", f"{image}={bin_dir}"]
        argv += [arg for key, value in (labels or {}).items()
                 for arg in ("--label", f"{key}={value}")]
        argv += [arg for taint in taints or [] for arg in ("--taint", taint)]
        log = open(tmp_path / f"node-{name}.log", "wb")  # noqa: SIM115 (the node's lifetime)
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        started.append((name, proc, log))
        wait_for(f"local node {name} Ready", lambda: proc.poll() is None
                 and node_ready(kube, name), timeout=30)
        return name

    yield start
    for name, proc, log in started:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        delete_node(kube, name)


def local_node_log(tmp_path: Path, node: str, namespace: str, pod: str,
                   container: str) -> Path:
    """Where the local node writes a container's output."""
    return tmp_path / f"node-{node}" / f"{namespace}_{pod}_{container}.log"
