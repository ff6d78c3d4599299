"""The Kubernetes backend against a real control plane, a real Prefect server and the real
`flowhand` console script.

The cluster is scripts/kube-test-cluster's (etcd, kube-apiserver, controller-manager, scheduler,
kwok). Each test makes its own node and a pool whose template pins pods to it (a nodeSelector on
`kubernetes.io/hostname`): a kwok node, whose pods run until the test reports what a kubelet
would (and the test plays the engine, writing the run's states), or a local node (tests.kube_node)
that really runs the pod's command: the stand-in engine, reporting to the server on loopback.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowhand.backends.kubernetes import KubernetesBackend
from tests import console
from tests.kube_cluster import (
    Kube,
    KubeCluster,
    create_limit_range,
    create_resource_quota,
    evict,
    evicted_by_kubelet,
    kube,
    kube_cluster,
    kube_namespace,
    kwok_node,
    local_node,
    terminate_container,
    wait_container,
    wait_for,
)
from tests.prefect_env import API, PrefectServer, engine_command

pytestmark = pytest.mark.kubernetes

__all__ = ["kube", "kube_cluster", "kube_namespace", "kwok_node", "local_node"]

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


# -- set-up ------------------------------------------------------------------------------------


def pinned_template(node: str | None = None, selector: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """Prefect's kubernetes template with the pods pinned to one node (or label)."""
    template = copy.deepcopy(KubernetesBackend.default_base_job_template())
    pod_spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod_spec["nodeSelector"] = selector or {"kubernetes.io/hostname": str(node)}
    return template


class Cluster:
    """One test's pool, namespace and workers; and the test side of the cluster."""

    def __init__(self, api: API, kube: Kube, namespace: str, env: dict[str, str]) -> None:
        self.api, self.kube, self.namespace, self.env = api, kube, namespace, env
        self.workers: list[console.Running] = []
        self.pool = ""

    def make_pool(self, template: dict[str, Any]) -> str:
        self.pool = self.api.create_pool(type="kubernetes", template=template)
        return self.pool

    def deployment(self, **variables: Any) -> str:
        return self.api.create_deployment(self.pool, job_variables={
            "namespace": self.namespace, "image": "busybox:1.36", **variables})

    def start_worker(self, name: str = "k8s-worker", **extra: str) -> console.Running:
        env = {**self.env, "FLOWHAND_NAME": name,
               "FLOWHAND_STATE_DIR": self.env["FLOWHAND_STATE_DIR"] + "-" + name, **extra}
        worker = console.Running("start", "-p", self.pool, "--type", "kubernetes", env=env,
                                 stdout=subprocess.DEVNULL)
        self.workers.append(worker)
        return worker

    def jobs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": f"prefect.io/flow-run-id={run_id}"} if run_id else {}
        return self.kube.items(f"/apis/batch/v1/namespaces/{self.namespace}/jobs", **params)

    def pod_of(self, run_id: str, timeout: float = 60) -> str:
        """The name of the run's pod, once it exists."""
        pods = wait_for(f"a pod for run {run_id}", lambda: self.kube.pods(
            self.namespace, f"prefect.io/flow-run-id={run_id}"), timeout=timeout)
        return str(pods[0]["metadata"]["name"])

    def running_pod(self, run_id: str, timeout: float = 60) -> str:
        def running() -> str | None:
            for pod in self.kube.pods(self.namespace, f"prefect.io/flow-run-id={run_id}"):
                if pod.get("status", {}).get("phase") == "Running":
                    return str(pod["metadata"]["name"])
            return None
        return str(wait_for(f"run {run_id}'s pod Running", running, timeout=timeout))

    def play_engine(self, run_id: str, final: str = "COMPLETED") -> None:
        """What Prefect's engine in the pod would write: RUNNING, then the final state."""
        for state in ("RUNNING", final):
            self.api.call("POST", f"/flow_runs/{run_id}/set_state", json={
                "state": {"type": state, "state_details": {
                    "transition_id": str(uuid.uuid4())}}, "force": True})

    def logs_text(self, run_id: str) -> str:
        return "\n".join(entry["message"] for entry in self.api.logs(run_id))

    def wait_logged(self, run_id: str, needle: str, timeout: float = 30) -> None:
        wait_for(f"{needle!r} in run {run_id}'s logs",
                 lambda: needle in self.logs_text(run_id), timeout=timeout)

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.stop(timeout=30, signum=signal.SIGKILL)


@pytest.fixture
def cluster(api: API, kube: Kube, kube_namespace: str, kube_cluster: KubeCluster,
            prefect_server: PrefectServer, tmp_path: Path) -> Iterator[Cluster]:
    env = console.base_env(
        tmp_path, PREFECT_API_URL=prefect_server.api_url,
        KUBECONFIG=str(kube_cluster.kubeconfig), FLOWHAND_STATE_DIR=str(tmp_path / "state"),
        FLOWHAND_POLL_INTERVAL_SECONDS="0.3", FLOWHAND_LOGGING__LEVEL="info")
    made = Cluster(api, kube, kube_namespace, env)
    yield made
    made.stop_all()


def history_types(api: API, run_id: str) -> list[str]:
    return [s["type"] for s in sorted(api.history(run_id), key=lambda s: s["timestamp"])]


def crashed_with(api: API, run_id: str, *needles: str, timeout: float = 60) -> dict[str, Any]:
    state = api.wait_final(run_id, timeout=timeout)
    assert state["type"] == "CRASHED", state
    for needle in needles:
        assert needle in (state.get("message") or ""), (needle, state.get("message"))
    return state


# -- a run's life on a node that really runs it --------------------------------------------------


def test_run_completes_and_its_job_is_cleaned(cluster: Cluster, local_node: Callable[..., str]):
    """A run on a local node completes (the stand-in engine reports it); its Job carries
    Prefect's labels and pid format, and finished_job_ttl removes it."""
    node = local_node()
    cluster.make_pool(pinned_template(node))
    dep = cluster.deployment(command=engine_command("--print", "hello-from-pod"),
                             finished_job_ttl=1)
    run_id = cluster.api.create_run(dep)
    cluster.start_worker()
    state = cluster.api.wait_final(run_id, timeout=90)
    assert state["type"] == "COMPLETED", state
    run = cluster.api.flow_run(run_id)
    namespace, _, job_name = run["infrastructure_pid"].partition(":")
    assert namespace == cluster.namespace and job_name
    wait_for("the finished Job removed (finished_job_ttl)",
             lambda: not cluster.jobs(run_id), timeout=60)


def test_exit_code_3_is_crashed_with_the_code(cluster: Cluster, local_node: Callable[..., str]):
    """A pod whose command exits 3 without a final state ends CRASHED, naming status 3."""
    node = local_node()
    cluster.make_pool(pinned_template(node))
    dep = cluster.deployment(command=engine_command("--state", "none", "--exit", "3"))
    run_id = cluster.api.create_run(dep)
    cluster.start_worker()
    crashed_with(cluster.api, run_id, "3", timeout=90)
    cluster.wait_logged(run_id, "exited with status 3")


def test_cancellation_deletes_the_job_and_ends_cancelled(
        cluster: Cluster, local_node: Callable[..., str]):
    """Cancelling a running run deletes its Job (the pod's process is stopped) and the run ends
    CANCELLED."""
    node = local_node()
    cluster.make_pool(pinned_template(node))
    dep = cluster.deployment(command=engine_command("--sleep", "300"))
    run_id = cluster.api.create_run(dep)
    cluster.start_worker()
    cluster.running_pod(run_id, timeout=90)
    wait_for("the run RUNNING", lambda: cluster.api.state(run_id)["type"] == "RUNNING",
             timeout=60)
    cluster.api.call("POST", f"/flow_runs/{run_id}/set_state",
                     json={"state": {"type": "CANCELLING"}, "force": True})
    state = cluster.api.wait_final(run_id, timeout=90)
    assert state["type"] == "CANCELLED", state
    wait_for("the Job deleted", lambda: not cluster.jobs(run_id), timeout=60)


# -- what a kubelet, the scheduler or admission says ---------------------------------------------


def test_oom_killed_is_crashed_with_the_reason(cluster: Cluster, kwok_node: Callable[..., str]):
    """An OOMKilled container ends the run CRASHED saying OOMKilled and the memory limit."""
    cluster.make_pool(pinned_template(kwok_node()))
    run_id = cluster.api.create_run(cluster.deployment(memory_limit="64Mi"))
    cluster.start_worker()
    pod = cluster.running_pod(run_id)
    terminate_container(cluster.kube, cluster.namespace, pod, 137, reason="OOMKilled")
    crashed_with(cluster.api, run_id, "OOMKilled", "64Mi")
    cluster.wait_logged(run_id, "OOMKilled")


def test_eviction_api_is_crashed_not_left_running(cluster: Cluster,
                                                  kwok_node: Callable[..., str]):
    """A pod evicted through the Eviction API ends its RUNNING run CRASHED, saying evicted."""
    cluster.make_pool(pinned_template(kwok_node()))
    run_id = cluster.api.create_run(cluster.deployment())
    cluster.start_worker()
    pod = cluster.running_pod(run_id)
    cluster.play_engine(run_id, final="RUNNING")
    response = evict(cluster.kube, cluster.namespace, pod)
    assert response.status_code < 300, response.text
    crashed_with(cluster.api, run_id, "evicted", timeout=90)


def test_node_pressure_eviction_is_crashed_with_the_kubelets_message(
        cluster: Cluster, kwok_node: Callable[..., str]):
    """A pod the kubelet evicted (node pressure) ends the run CRASHED with its message."""
    cluster.make_pool(pinned_template(kwok_node()))
    run_id = cluster.api.create_run(cluster.deployment())
    cluster.start_worker()
    pod = cluster.running_pod(run_id)
    cluster.play_engine(run_id, final="RUNNING")
    evicted_by_kubelet(cluster.kube, cluster.namespace, pod)
    crashed_with(cluster.api, run_id, "low on resource", timeout=90)


@pytest.mark.parametrize("reason", ["ErrImagePull", "CreateContainerConfigError"])
def test_pod_that_can_never_start_is_crashed_and_its_job_deleted(
        cluster: Cluster, kwok_node: Callable[..., str], reason: str):
    """An image that cannot be pulled or a missing secret: CRASHED at once with the reason in
    the run's logs, and the Job is deleted (not left behind)."""
    cluster.make_pool(pinned_template(kwok_node(hold=True)))
    run_id = cluster.api.create_run(cluster.deployment())
    cluster.start_worker()
    pod = cluster.pod_of(run_id)
    wait_for("the pod bound", lambda: cluster.kube.pod(cluster.namespace, pod)
             .get("spec", {}).get("nodeName"))
    wait_container(cluster.kube, cluster.namespace, pod, reason, 'secret "db" not found'
                   if reason == "CreateContainerConfigError" else "pull access denied")
    crashed_with(cluster.api, run_id, reason)
    cluster.wait_logged(run_id, reason)
    wait_for("the Job deleted", lambda: not cluster.jobs(run_id), timeout=30)


def test_quota_refusal_says_why_then_crashes_at_the_pod_timeout(
        cluster: Cluster, kwok_node: Callable[..., str]):
    """A ResourceQuota that refuses the pod: said at once in the run's logs, CRASHED with it
    when pod_watch_timeout_seconds passes, and the Job deleted so it cannot start later."""
    cluster.make_pool(pinned_template(kwok_node()))
    create_resource_quota(cluster.kube, cluster.namespace, {"pods": "0"})
    run_id = cluster.api.create_run(cluster.deployment(pod_watch_timeout_seconds=20))
    cluster.start_worker()
    cluster.wait_logged(run_id, "exceeded quota", timeout=40)
    assert cluster.api.state(run_id)["type"] == "PENDING"
    crashed_with(cluster.api, run_id, "exceeded quota", "pod_watch_timeout_seconds=20")
    wait_for("the Job deleted", lambda: not cluster.jobs(run_id), timeout=30)


def test_limit_range_refusal_is_crashed_at_once(cluster: Cluster, kwok_node: Callable[..., str]):
    """A LimitRange that refuses the pod's memory limit ends the run CRASHED with the refusal,
    well before the pod timeout."""
    cluster.make_pool(pinned_template(kwok_node()))
    create_limit_range(cluster.kube, cluster.namespace,
                       [{"type": "Container", "max": {"memory": "64Mi"}}])
    run_id = cluster.api.create_run(cluster.deployment(memory_limit="128Mi",
                                                       pod_watch_timeout_seconds=300))
    cluster.start_worker()
    crashed_with(cluster.api, run_id, "64Mi", timeout=60)


def test_unschedulable_crashes_with_the_schedulers_message(
        cluster: Cluster, kwok_node: Callable[..., str]):
    """A pod no node fits waits, says the scheduler's message in the run's logs, and ends
    CRASHED with it only at pod_watch_timeout_seconds."""
    cluster.make_pool(pinned_template(selector={"flowhand.test/slot": uuid.uuid4().hex}))
    run_id = cluster.api.create_run(cluster.deployment(pod_watch_timeout_seconds=20))
    cluster.start_worker()
    cluster.wait_logged(run_id, "waiting for a node", timeout=40)
    assert cluster.api.state(run_id)["type"] == "PENDING"
    crashed_with(cluster.api, run_id, "Unschedulable", "pod_watch_timeout_seconds=20")
    wait_for("the Job deleted", lambda: not cluster.jobs(run_id), timeout=30)


def test_no_node_for_90_s_then_one_appears_completes_never_crashed(
        cluster: Cluster, kube: Kube, kwok_node: Callable[..., str]):
    """A pod that waits 90 s for a node (an autoscaler's delay) starts when one appears and the
    run completes; its state history never holds CRASHED."""
    slot = uuid.uuid4().hex
    cluster.make_pool(pinned_template(selector={"flowhand.test/slot": slot}))
    run_id = cluster.api.create_run(cluster.deployment(pod_watch_timeout_seconds=600))
    cluster.start_worker()
    cluster.wait_logged(run_id, "waiting for a node", timeout=40)
    time.sleep(90)
    assert "CRASHED" not in history_types(cluster.api, run_id)
    kwok_node(labels={"flowhand.test/slot": slot})
    pod = cluster.running_pod(run_id, timeout=60)
    cluster.play_engine(run_id)
    terminate_container(kube, cluster.namespace, pod, 0)
    assert cluster.api.wait_final(run_id, timeout=60)["type"] == "COMPLETED"
    time.sleep(2)  # a late wrong report would land now
    assert "CRASHED" not in history_types(cluster.api, run_id)
    assert cluster.logs_text(run_id).count("waiting for a node") == 1


# -- restarts and fleets ---------------------------------------------------------------------------


def test_kill_9_with_10_runs_in_flight_then_restart(cluster: Cluster,
                                                     kwok_node: Callable[..., str]):
    """kill -9 of the worker with 10 Jobs running; while it is down 4 complete, 3 exit 3 and 3
    Jobs are deleted by hand; the restarted worker re-attaches and each run reaches its true
    final state (COMPLETED; CRASHED with 3; CRASHED as vanished)."""
    cluster.make_pool(pinned_template(kwok_node()))
    dep = cluster.deployment()
    run_ids = [cluster.api.create_run(dep) for _ in range(10)]
    worker = cluster.start_worker()
    pods = {run_id: cluster.running_pod(run_id, timeout=90) for run_id in run_ids}
    wait_for("every pid recorded", lambda: all(
        cluster.api.flow_run(r).get("infrastructure_pid") for r in run_ids), timeout=30)
    worker.stop(timeout=10, signum=signal.SIGKILL)
    done, failed, vanished = run_ids[:4], run_ids[4:7], run_ids[7:]
    for run_id in done:
        cluster.play_engine(run_id)
        terminate_container(cluster.kube, cluster.namespace, pods[run_id], 0)
    for run_id in failed:
        cluster.play_engine(run_id, final="RUNNING")
        terminate_container(cluster.kube, cluster.namespace, pods[run_id], 3)
    for run_id in vanished:
        job = cluster.api.flow_run(run_id)["infrastructure_pid"].split(":")[1]
        cluster.kube.delete(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs/{job}",
                            propagationPolicy="Background")
    cluster.start_worker()
    for run_id in done:
        assert cluster.api.wait_final(run_id, timeout=90)["type"] == "COMPLETED"
    for run_id in failed:
        crashed_with(cluster.api, run_id, "3", timeout=90)
    for run_id in vanished:
        crashed_with(cluster.api, run_id, timeout=90)


class Completer:
    """The engine of many kwok pods: each Running pod's run is set COMPLETED and its container
    exits 0. Counts the Jobs each run had."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.done: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[str] = []

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                for pod in self.cluster.kube.pods(self.cluster.namespace):
                    self._complete(pod)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
            time.sleep(0.3)

    def _complete(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        run_id = pod["metadata"].get("labels", {}).get("prefect.io/flow-run-id")
        if name in self.done or not run_id or pod.get("status", {}).get("phase") != "Running":
            return
        self.done.add(name)
        self.cluster.play_engine(run_id)
        terminate_container(self.cluster.kube, self.cluster.namespace, name, 0)


@pytest.mark.fleet
def test_200_runs_across_two_workers_one_killed_mid_claim(
        cluster: Cluster, kwok_node: Callable[..., str]):
    """200 runs on kwok nodes served by two workers, one killed with -9 while it claims: every
    run COMPLETED and each had exactly one Job (executed once)."""
    nodes = [kwok_node() for _ in range(2)]
    selector = {"flowhand.test/fleet": cluster.namespace}
    for node in nodes:
        cluster.kube.patch(f"/api/v1/nodes/{node}", {"metadata": {"labels": selector}})
    cluster.make_pool(pinned_template(selector=selector))
    dep = cluster.deployment(finished_job_ttl=3600)
    run_ids = [cluster.api.create_run(dep) for _ in range(200)]
    completer = Completer(cluster)
    completer.thread.start()
    fleet_env = {"FLOWHAND_CLAIM_LEASE_SECONDS": "20", "FLOWHAND_TAKEOVER_INTERVAL_SECONDS": "3",
                 "FLOWHAND_HEARTBEAT_INTERVAL_SECONDS": "5"}
    cluster.start_worker("fleet-a", **fleet_env)
    doomed = cluster.start_worker("fleet-b", **fleet_env)
    doomed.wait_for("flow_run.claimed", timeout=60)
    doomed.stop(timeout=10, signum=signal.SIGKILL)
    try:
        wait_for("200 runs final", lambda: all(
            cluster.api.state(r)["type"] in FINAL for r in run_ids), timeout=400, interval=2)
    finally:
        completer.stop.set()
        completer.thread.join(10)
    states = {r: cluster.api.state(r)["type"] for r in run_ids}
    assert set(states.values()) == {"COMPLETED"}, {s: list(states.values()).count(s)
                                                   for s in set(states.values())}
    jobs: dict[str, int] = {}
    for job in cluster.jobs():
        run_id = job["metadata"]["labels"]["prefect.io/flow-run-id"]
        jobs[run_id] = jobs.get(run_id, 0) + 1
    twice = {r: n for r, n in jobs.items() if n != 1}
    assert not twice and len(jobs) == 200, (twice, len(jobs))
    assert not completer.errors, completer.errors[:3]


def test_json_of_a_job_is_prefects(cluster: Cluster, kwok_node: Callable[..., str]):
    """The created Job has Prefect's labels on Job and pod, the pid `<namespace>:<job>`."""
    cluster.make_pool(pinned_template(kwok_node()))
    run_id = cluster.api.create_run(cluster.deployment(labels={"team": "data"}))
    cluster.start_worker()
    cluster.running_pod(run_id)
    job = cluster.jobs(run_id)[0]
    labels = job["metadata"]["labels"]
    assert labels["prefect.io/flow-run-id"] == run_id and labels["team"] == "data"
    assert "prefect.io/work-pool-name" in labels and "prefect.io/worker-name" in labels
    pid = wait_for("the pid", lambda: cluster.api.flow_run(run_id).get("infrastructure_pid"))
    assert pid == f"{cluster.namespace}:{job['metadata']['name']}"
    env = {e["name"]: e.get("value") for e in
           job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == run_id, json.dumps(env)[:500]
