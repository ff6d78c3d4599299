"""Where Prefect's kubernetes worker fails (issue 19), observed against the test cluster.

    python -m bench.kube_cases [--out FILE]      (from the repository root, with .venv's Python)

Needs a running test cluster (FLOWHAND_KUBE_CLUSTER_DIR, `scripts/kube-test-cluster up`) and
FLOWHAND_BENCH_ENV naming an environment with prefect and prefect-kubernetes (the worker and
the server come from there). One `prefect worker start --type kubernetes` (defaults, its kopf
observer on) serves one pool whose template pins each case's pod with a nodeSelector; the
cases run side by side:

- late-node-60 / late-node-600: no node fits the pod for 90 s, then one appears
  (pod_watch_timeout_seconds 60, Prefect's default, and 600);
- evicted: the pod Running, the run RUNNING, then the kubelet evicts it (node pressure);
- image-pull: the pod on a node stuck in ImagePullBackOff.

kwok runs no engine: when a pod runs, this script proposes what the engine would (RUNNING, then
COMPLETED, not forced, so the server may refuse) and reports the container exited 0. The
flowhand side of each case is tests/test_kubernetes.py's (see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.environment import PREFECT, RESULTS, clean_env, say
from bench.kube import BENCH_IMAGE, cluster_dir
from bench.server import BenchAPI
from bench.worker import WorkerProcess
from harness.prefect_server import PrefectServer
from tests.kube_cluster import (
    Kube,
    delete_node,
    evicted_by_kubelet,
    make_kwok_node,
    terminate_container,
    wait_container,
    wait_for,
)

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
SLOT = "flowhand.bench/slot"


class Cases:
    """The server, the pool, the namespace and the worker the cases share."""

    def __init__(self, home: Path, api: BenchAPI, kube: Kube, namespace: str, pool: str) -> None:
        self.home, self.api, self.kube, self.namespace, self.pool = (
            home, api, kube, namespace, pool)
        self.nodes: list[str] = []
        self.t0 = time.monotonic()

    def run(self, slot: str, **variables: Any) -> str:
        deployment = self.api.create_deployment(self.pool, {
            "namespace": self.namespace, "image": BENCH_IMAGE, "stream_output": False,
            "node_selector": {SLOT: slot}, **variables})
        return self.api.create_run(deployment)

    def node(self, slot: str, hold: bool = False) -> str:
        self.nodes.append(make_kwok_node(self.kube, labels={SLOT: slot}, hold=hold))
        return self.nodes[-1]

    def pods(self, run_id: str) -> list[dict[str, Any]]:
        return self.kube.pods(self.namespace, f"prefect.io/flow-run-id={run_id}")

    def jobs(self, run_id: str) -> list[dict[str, Any]]:
        return self.kube.items(f"/apis/batch/v1/namespaces/{self.namespace}/jobs",
                               labelSelector=f"prefect.io/flow-run-id={run_id}")

    def pod(self, run_id: str, phase: str | None = None, timeout: float = 120) -> str:
        def find() -> str | None:
            for pod in self.pods(run_id):
                if phase is None or pod.get("status", {}).get("phase") == phase:
                    return str(pod["metadata"]["name"])
            return None
        return str(wait_for(f"run {run_id}'s pod {phase or ''}", find, timeout=timeout))

    def engine(self, run_id: str, *states: str) -> list[str]:
        """Propose states as the engine would (not forced): the server's answers."""
        answers = []
        for state in states:
            response = self.api.http.post(f"flow_runs/{run_id}/set_state", json={
                "state": {"type": state, "state_details": {"transition_id": str(uuid.uuid4())}}})
            body = response.json() if response.content else {}
            answers.append(f"{state}: {body.get('status', response.status_code)}")
        return answers

    def watch(self, run_id: str, seconds: float,
              until: Callable[[str], bool] | None = None) -> list[str]:
        """The run's state every second for `seconds` (or until `until(type)`): its changes,
        with seconds since the cases started."""
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = self.api.state(run_id)
            kind = state["type"]
            if not seen or not seen[-1].startswith(kind):
                message = (state.get("message") or "")[:160]
                seen.append(f"{kind} at {time.monotonic() - self.t0:.0f} s"
                            + (f" ({message})" if message else ""))
            if until and until(kind):
                break
            time.sleep(1)
        return seen

    def ending(self, run_id: str) -> dict[str, Any]:
        history = sorted(self.api.history(run_id), key=lambda s: s["timestamp"])
        state = self.api.state(run_id)
        return {"final_state": state["type"], "final_message": state.get("message"),
                "history": [s["type"] for s in history],
                "job_left": [j["metadata"]["name"] for j in self.jobs(run_id)],
                "pods_left": [p["metadata"]["name"] for p in self.pods(run_id)]}


def late_node(c: Cases, pod_watch_timeout: int) -> dict[str, Any]:
    """No node fits for 90 s, then one appears."""
    slot = uuid.uuid4().hex[:10]
    run_id = c.run(slot, pod_watch_timeout_seconds=pod_watch_timeout)
    c.pod(run_id)
    appeared = time.monotonic() + 90
    seen = c.watch(run_id, 90)
    c.node(slot)
    out: dict[str, Any] = {"node_appeared_at_s": round(appeared - c.t0)}
    try:
        pod = c.pod(run_id, "Running", timeout=60)
    except AssertionError:
        out["pod_ran"] = False
    else:
        out["pod_ran"] = True
        out["engine_answers"] = c.engine(run_id, "RUNNING", "COMPLETED")
        terminate_container(c.kube, c.namespace, pod, 0)
    seen += c.watch(run_id, 30)
    return {**out, "states": seen, **c.ending(run_id)}


def evicted(c: Cases) -> dict[str, Any]:
    """The pod Running and the run RUNNING, then the kubelet evicts the pod."""
    slot = uuid.uuid4().hex[:10]
    c.node(slot)
    run_id = c.run(slot)
    pod = c.pod(run_id, "Running")
    answers = c.engine(run_id, "RUNNING")
    evicted_by_kubelet(c.kube, c.namespace, pod)
    evicted_at = round(time.monotonic() - c.t0)
    seen = c.watch(run_id, 150, until=lambda kind: kind in FINAL)
    return {"engine_answers": answers, "evicted_at_s": evicted_at, "states": seen,
            **c.ending(run_id)}


def image_pull(c: Cases) -> dict[str, Any]:
    """The pod's image cannot be pulled (ImagePullBackOff)."""
    slot = uuid.uuid4().hex[:10]
    c.node(slot, hold=True)
    run_id = c.run(slot)
    pod = c.pod(run_id)
    wait_for("the pod bound", lambda: c.kube.pod(c.namespace, pod)
             .get("spec", {}).get("nodeName"), timeout=60)
    wait_container(c.kube, c.namespace, pod, "ImagePullBackOff",
                   f'Back-off pulling image "{BENCH_IMAGE}"')
    reported_at = round(time.monotonic() - c.t0)
    seen = c.watch(run_id, 150, until=lambda kind: kind in FINAL)
    seen += c.watch(run_id, 30)  # then: is the Job still there?
    return {"backoff_at_s": reported_at, "states": seen, **c.ending(run_id)}


def template(api_url: str, home: Path) -> dict[str, Any]:
    """Prefect's default kubernetes template, with a nodeSelector variable."""
    out = subprocess.run(
        [str(PREFECT), "work-pool", "get-default-base-job-template", "--type", "kubernetes"],
        env={**clean_env(), "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "ph")},
        capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, Any] = json.loads(out.stdout)
    result["variables"]["properties"]["node_selector"] = {"type": "object",
                                                          "title": "Node selector"}
    pod_spec = result["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod_spec["nodeSelector"] = "{{ node_selector }}"
    return result


def run_cases(c: Cases) -> dict[str, Any]:
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "late-node-60": lambda: late_node(c, 60), "late-node-600": lambda: late_node(c, 600),
        "evicted": lambda: evicted(c), "image-pull": lambda: image_pull(c)}
    results: dict[str, Any] = {}
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - one case failing still reports the rest
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"{name}: {json.dumps(results[name])[:600]}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kube_cases", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS / "kube_cases.json")
    args = parser.parse_args(argv)
    directory = cluster_dir()
    home = Path(tempfile.mkdtemp(prefix="flowhand-kube-cases-"))
    (home / "server").mkdir()
    server = PrefectServer.start(home / "server", env_dir=PREFECT.parent.parent,
                                 inherit=clean_env(), ready_timeout=180)
    api, kube = BenchAPI(server.api_url), Kube(directory)
    namespace = f"cases-{uuid.uuid4().hex[:6]}"
    worker: WorkerProcess | None = None
    c: Cases | None = None
    try:
        kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        wait_for("default service account", lambda: kube.find(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/default"), timeout=60)
        pool = api.create_pool(type="kubernetes", template=template(server.api_url, home))
        c = Cases(home, api, kube, namespace, pool)
        worker = WorkerProcess("prefect", pool, "kubernetes", server.api_url, home,
                               extra_env={"KUBECONFIG": str(directory / "admin.kubeconfig")})
        worker.start()
        worker.wait_ready(api)
        say(f"prefect worker ready on pool {pool}; running the cases (about 4 minutes)")
        results = run_cases(c)
        results["worker_log_tail"] = worker.tail(60).splitlines()
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        say(f"written {args.out}")
    finally:
        if worker is not None:
            worker.stop(grace=20)
        for node in c.nodes if c else []:
            with contextlib.suppress(AssertionError):
                delete_node(kube, node)
        with contextlib.suppress(AssertionError):
            kube.delete(f"/api/v1/namespaces/{namespace}")
        kube.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
