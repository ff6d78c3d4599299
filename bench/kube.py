"""What the kubernetes workload needs around each worker: kwok nodes, a namespace, a counting
proxy in front of the kube-apiserver (one per worker: its requests are counted by what they do)
and a "completer" that plays kubelet and engine for the runs' pods.

kwok runs no container, and so no engine: nothing would ever report a run's states. The
completer does, the same for both workers: when a run's pod is Running it sets the flow run
RUNNING through Prefect's API, one second later COMPLETED (forced, as an engine starting and
finishing a one-second flow would), then reports the pod's container terminated with exit code 0
(as tests.kube_cluster.terminate_container does). It also
watches the namespace's Jobs to time when each run's Job was created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.analysis import classify_kube_request
from bench.environment import say
from tests.kube_cluster import Kube, make_kwok_node, terminate_container, wait_for

BENCH_IMAGE = "flowhand-bench/none:1"  # never pulled: kwok runs no container


def cluster_dir() -> Path:
    """The test cluster scripts/kube-test-cluster started (FLOWHAND_KUBE_CLUSTER_DIR)."""
    value = os.environ.get("FLOWHAND_KUBE_CLUSTER_DIR")
    if not value or not (Path(value) / "ports.env").exists():
        raise SystemExit("the kubernetes workload needs a running test cluster: "
                         "export FLOWHAND_KUBE_CLUSTER_DIR=DIR and "
                         "eval \"$(scripts/kube-test-cluster up)\" first")
    return Path(value)


class CountingProxy:
    """A loopback HTTP endpoint that forwards every request to the kube-apiserver over TLS
    with the admin certificate, counting requests by what they do ("list pods", "watch jobs",
    "create jobs"...). Responses (watch streams included) are piped through untouched."""

    def __init__(self, kube: Kube, directory: Path) -> None:
        pki = directory / "pki"
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        host_port = kube.server.removeprefix("https://")
        self.host, port = host_port.rsplit(":", 1)
        self.upstream_port = int(port)
        self.counts: Counter[str] = Counter()
        self.port = 0
        self.server: asyncio.Server
        self.tasks: set[asyncio.Task[Any]] = set()  # held: the loop keeps only weak references
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> int:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection still open (watches), then the loop."""
        async def shut() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # Connections cut here end in CancelledError: expected, not worth a traceback.
        self.loop.set_exception_handler(lambda loop, context: None)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def kubeconfig(self, path: Path, user: str) -> Path:
        """A kubeconfig for one worker: this proxy, a token the proxy ignores."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "bench", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": user, "user": {"token": f"bench-{user}"}}],
            "contexts": [{"name": user, "context": {"cluster": "bench", "user": user}}],
        }))
        return path

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.host, self.upstream_port, ssl=self.context)
        except OSError:
            writer.close()
            return
        back = asyncio.ensure_future(self._pipe(up_reader, writer))
        me = asyncio.current_task()
        held = {back, me} if me else {back}
        self.tasks |= held
        try:
            await self._requests(reader, up_writer)
        finally:
            with contextlib.suppress(Exception):
                await back
            for w in (writer, up_writer):
                w.close()
            self.tasks -= held

    async def _requests(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        """Forward requests one by one (HTTP/1.1 keep-alive), counting each."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target = (lines[0].split(" ") + ["", ""])[:2]
            self.counts[classify_kube_request(method, target)] += 1
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            up.write(head)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                await self._pipe(reader, up)  # rare; the rest of this connection uncounted
                return
            length = int(headers.get("content-length", "0") or 0)
            if length:
                up.write(await reader.readexactly(length))
            await up.drain()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
            sink.write_eof()


def run_id_of(obj: dict[str, Any]) -> str | None:
    """The flow run a Job or pod belongs to: its label, else PREFECT__FLOW_RUN_ID."""
    labels = obj.get("metadata", {}).get("labels") or {}
    if labels.get("prefect.io/flow-run-id"):
        return str(labels["prefect.io/flow-run-id"])
    spec = obj.get("spec", {})
    pod_spec = spec.get("template", {}).get("spec", spec)
    for container in pod_spec.get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == "PREFECT__FLOW_RUN_ID":
                return str(env.get("value"))
    return None


class Completer:
    """Plays kubelet and engine for one namespace's pods (see the module's docstring), and
    notes when each run's Job appeared (wall clock, by a watch)."""

    def __init__(self, kube: Kube, namespace: str, api_url: str, poll: float = 0.25,
                 run_seconds: float = 1.0) -> None:
        self.kube, self.namespace, self.poll = kube, namespace, poll
        self.run_seconds = run_seconds
        #: Pods running "the flow": pod name -> (run id, when it ends).
        self.running: dict[str, tuple[str | None, float]] = {}
        #: Runs completed; and those found not COMPLETED again later (a worker's late report
        #: re-opened them: Prefect's observer does), completed again and counted.
        self.finished: set[str] = set()
        self.reopened: Counter[str] = Counter()
        self.next_check = 0.0
        self.prefect = httpx.Client(base_url=api_url, timeout=30)
        self.job_seen: dict[str, float] = {}
        self.completed: set[str] = set()
        self.errors: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._complete, daemon=True),
                        threading.Thread(target=self._watch_jobs, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(5)
        self.prefect.close()

    def _complete(self) -> None:
        while not self.stopping.is_set():
            try:
                pods = self.kube.pods(self.namespace)
            except (httpx.HTTPError, AssertionError):
                self.errors["list pods"] += 1
                time.sleep(1)
                continue
            for pod in pods:
                uid = pod["metadata"]["uid"]
                if uid in self.completed or pod.get("status", {}).get("phase") != "Running":
                    continue
                self.completed.add(uid)
                run_id = run_id_of(pod)
                self._propose(run_id, "RUNNING")
                self.running[pod["metadata"]["name"]] = (run_id,
                                                         time.monotonic() + self.run_seconds)
            for name, (run_id, ends) in list(self.running.items()):
                if time.monotonic() >= ends:
                    del self.running[name]
                    self._finish(name, run_id)
            if self.finished and time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + 2.0
                self._complete_reopened()
            self.stopping.wait(self.poll)

    def _complete_reopened(self) -> None:
        try:
            runs = self.prefect.post("/flow_runs/filter", json={"flow_runs": {
                "id": {"any_": sorted(self.finished)},
                "state": {"type": {"not_any_": ["COMPLETED"]}}}}).json()
        except (httpx.HTTPError, ValueError):
            self.errors["check reopened"] += 1
            return
        for run in runs:
            self.reopened[run["id"]] += 1
            self._propose(run["id"], "COMPLETED")

    def _propose(self, run_id: str | None, state: str) -> None:
        """What the engine would report (forced: the stand-in must not be refused)."""
        if not run_id:
            self.errors["pod without a flow run id"] += 1
            return
        try:
            self.prefect.post(f"/flow_runs/{run_id}/set_state", json={
                "state": {"type": state, "name": state.title()}, "force": True,
            }).raise_for_status()
        except httpx.HTTPError as exc:
            self.errors[f"set {state}: {type(exc).__name__}"] += 1

    def _finish(self, pod: str, run_id: str | None) -> None:
        self._propose(run_id, "COMPLETED")
        if run_id:
            self.finished.add(run_id)
        try:
            terminate_container(self.kube, self.namespace, pod, 0)
        except (httpx.HTTPError, AssertionError) as exc:
            self.errors[f"terminate: {type(exc).__name__}"] += 1

    def _watch_jobs(self) -> None:
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        version = ""
        while not self.stopping.is_set():
            params = {"watch": "1", "timeoutSeconds": "30", "allowWatchBookmarks": "false"}
            if version:
                params["resourceVersion"] = version
            with contextlib.suppress(httpx.HTTPError, ValueError), self.kube.http.stream(
                    "GET", path, params=params, timeout=httpx.Timeout(30, read=40)) as response:
                    for line in response.iter_lines():
                        event = json.loads(line)
                        obj = event.get("object", {})
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        run_id = run_id_of(obj)
                        if event.get("type") == "ADDED" and run_id:
                            self.job_seen.setdefault(run_id, time.time())
                        if self.stopping.is_set():
                            return


class KubeSetup:
    """One worker's share of the cluster: a namespace, its proxy and its completer."""

    nodes: list[str] = []

    def __init__(self, kind: str, home: Path, api_url: str) -> None:
        self.directory = cluster_dir()
        self.kube = Kube(self.directory)
        self.namespace = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
        self.proxy = CountingProxy(self.kube, self.directory)
        self.completer = Completer(self.kube, self.namespace, api_url)
        self.kubeconfig = home / f"kubeconfig-{self.namespace}"
        self.kind = kind

    def start(self, nodes: int = 4) -> dict[str, str]:
        """Nodes (once), the namespace, the proxy and the completer; the worker's extra env."""
        kube = self.kube
        have = [n["metadata"]["name"] for n in kube.items("/api/v1/nodes")
                if n["metadata"]["name"].startswith("kwok-bench-")]
        for i in range(len(have), nodes):
            make_kwok_node(kube, f"kwok-bench-{i}")
        kube.create("/api/v1/namespaces", {"metadata": {"name": self.namespace}})
        wait_for("default service account", lambda: kube.find(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/default"), timeout=60)
        self.proxy.start()
        self.proxy.kubeconfig(self.kubeconfig, f"{self.kind}-worker")
        self.completer.start()
        return {"KUBECONFIG": str(self.kubeconfig)}

    def job_variables(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "image": BENCH_IMAGE, "image_pull_policy": "Never",
                "stream_output": False}

    def close(self) -> dict[str, Any]:
        """Stop the completer and the proxy, delete the namespace; what they recorded."""
        self.completer.stop()
        self.proxy.stop()
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            self.kube.delete(f"/api/v1/namespaces/{self.namespace}")
        self.kube.close()
        if self.completer.errors:
            say(f"  completer errors: {dict(self.completer.errors)}")
        return {"kube_requests": dict(self.proxy.counts),
                "job_seen": dict(self.completer.job_seen),
                "completer_errors": dict(self.completer.errors),
                "reopened_after_completed": sum(self.completer.reopened.values())}
