"""A small kubelet for the tests: one node of the test cluster whose pods really run, as local
processes.

It owns one node (not kwok's): creates it, keeps it Ready (its Lease renewed, its status
refreshed), and for each pod bound to it runs the first container's command + args as a local
process group with the container's env, then reports what a kubelet would: Running with a
containerID and start time, then Terminated with the process's real exit code (Completed /
Error). A deleted pod's process gets SIGTERM, SIGKILL after the grace period, and the delete is
then finished. A missing secret or config map in the env is CreateContainerConfigError, as on a
real node.

Images map to local environments: `--image flowhand-test/prefect=/path/to/venv/bin` puts that
directory first on PATH for pods of that image (any tag); other images run their command as is.
Each container's output goes to <state>/<namespace>_<pod>_<container>.log, served to the
apiserver as a kubelet does, so `pods/log` (with follow and tailLines) works.

    python -m tests.kube_node --kubeconfig-dir <cluster dir> --node NAME --state DIR [--image ...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

LEASE_SECONDS = 40


class LogServer(ThreadingHTTPServer):
    """The kubelet's /containerLogs endpoint on 127.0.0.1, so `pods/log` (follow too) works:
    the apiserver connects with its kubelet client certificate, signed by the cluster's CA."""

    daemon_threads = True

    def __init__(self, node: LocalNode, pki: Path) -> None:
        super().__init__(("127.0.0.1", 0), LogHandler)
        self.node = node
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "kwok-serving.crt"), str(pki / "kwok-serving.key"))
        context.verify_mode = ssl.CERT_REQUIRED
        self.socket = context.wrap_socket(self.socket, server_side=True)


class LogHandler(BaseHTTPRequestHandler):
    server: LogServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404)
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = self.server.node.state / f"{parts[1]}_{parts[2]}_{parts[3]}.log"
        if not path.exists():
            self.send_error(404, "container not started")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        with open(path, "rb") as log:
            if "tailLines" in query:
                lines = log.read().splitlines(keepends=True)[-int(query["tailLines"]):]
                self.wfile.write(b"".join(lines))
            self.follow(log, parts[1], parts[2], query.get("follow") == "true")

    def follow(self, log: Any, namespace: str, pod: str, follow: bool) -> None:
        while True:
            chunk = log.read(65536)
            if chunk:
                self.wfile.write(chunk)
                self.wfile.flush()
                continue
            if not follow or not self.server.node.running(namespace, pod):
                return
            time.sleep(0.2)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the apiserver's requests need no access log


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """The container cannot be configured (CreateContainerConfigError)."""


class LocalNode:
    def __init__(self, cluster_dir: Path, node: str, state: Path,
                 images: dict[str, str], labels: dict[str, str],
                 taints: list[dict[str, str]]) -> None:
        pki = cluster_dir / "pki"
        ports = dict(line.split("=", 1) for line in
                     (cluster_dir / "ports.env").read_text().split())
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.http = httpx.Client(base_url=f"https://127.0.0.1:{ports['APISERVER_PORT']}",
                                 verify=context, timeout=30)
        self.node, self.state, self.images = node, state, images
        self.labels, self.taints = labels, taints
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # pod uid -> its process
        self.seen: set[str] = set()  # pods started (or being started)
        self.deleting: set[str] = set()  # pods whose deletion is being carried out
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.names: dict[str, tuple[str, str]] = {}  # pod uid -> (namespace, name), while running
        self.logs = LogServer(self, pki)
        threading.Thread(target=self.logs.serve_forever, daemon=True).start()

    def running(self, namespace: str, pod: str) -> bool:
        with self.lock:
            return (namespace, pod) in self.names.values()

    # --- the node -------------------------------------------------------------------------

    def register(self) -> None:
        self.http.delete(f"/api/v1/nodes/{self.node}")
        body = {"metadata": {"name": self.node, "labels": {
            "kubernetes.io/hostname": self.node, "flowhand.test/node": "local", **self.labels}},
            "spec": {"taints": self.taints}}
        for _ in range(100):  # the old node object may still be going away
            if self.http.post("/api/v1/nodes", json=body).status_code != 409:
                break
            time.sleep(0.1)
        self.report_node()

    def report_node(self) -> None:
        stamp = now()
        conditions = [{"type": kind, "status": status, "reason": reason,
                       "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
                      for kind, status, reason in (
                          ("Ready", "True", "KubeletReady"),
                          ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                          ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                          ("PIDPressure", "False", "KubeletHasSufficientPID"))]
        resources = {"cpu": "8", "memory": "32Gi", "pods": "110"}
        self._patch(f"/api/v1/nodes/{self.node}/status", {"status": {
            "conditions": conditions, "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs.server_address[1]}},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "flowhand-test-node", "containerRuntimeVersion":
                         "local-process://1", "kernelVersion": os.uname().release,
                         "osImage": "", "machineID": "", "systemUUID": "", "bootID": "",
                         "kubeProxyVersion": ""}}})

    def heartbeat(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        last_status = 0.0
        while not self.stopping.is_set():
            try:
                spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                        "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
                if self.http.patch(path, content=json.dumps({"spec": spec}), headers={
                        "Content-Type": "application/merge-patch+json"}).status_code == 404:
                    self.http.post(path.rsplit("/", 1)[0], json={
                        "metadata": {"name": self.node}, "spec": spec})
                if time.monotonic() - last_status > 30:
                    self.report_node()
                    last_status = time.monotonic()
            except httpx.HTTPError:
                pass  # the apiserver may be restarting: the next beat retries
            self.stopping.wait(5)

    # --- pods -------------------------------------------------------------------------------

    def watch_pods(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        while not self.stopping.is_set():
            try:
                listing = self.http.get("/api/v1/pods", params=selector).json()
                for pod in listing["items"]:
                    self.handle(pod)
                version = listing["metadata"]["resourceVersion"]
                params = {**selector, "watch": "1", "resourceVersion": version,
                          "allowWatchBookmarks": "true", "timeoutSeconds": "60"}
                with self.http.stream("GET", "/api/v1/pods", params=params,
                                      timeout=httpx.Timeout(30, read=90)) as stream:
                    for line in stream.iter_lines():
                        event = json.loads(line)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.handle(event["object"])
                        elif event["type"] == "DELETED":
                            self.kill(event["object"], grace=0)
                        elif event["type"] == "ERROR":
                            break  # 410 Gone and the like: list again
            except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                self.stopping.wait(1)

    def handle(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp"):
            with self.lock:
                if uid in self.deleting:
                    return
                self.deleting.add(uid)
            grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
            threading.Thread(target=self.finish_delete, args=(pod, grace), daemon=True).start()
            return
        with self.lock:
            if uid in self.seen or pod.get("status", {}).get("phase") != "Pending":
                return
            self.seen.add(uid)
        threading.Thread(target=self.run_pod, args=(pod,), daemon=True).start()

    def run_pod(self, pod: dict[str, Any]) -> None:
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        while True:  # as a kubelet does, retry until the secret appears or the pod goes
            try:
                env = self.container_env(pod, container)
                break
            except ConfigError as exc:
                self.report(pod, {"waiting": {"reason": "CreateContainerConfigError",
                                              "message": str(exc)}}, "Pending", None)
            if self.stopping.wait(2):
                return
            current = self.http.get(path)
            if current.status_code == 404 or current.json()["metadata"].get(
                    "deletionTimestamp"):
                return
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        log = self.state / f"{meta['namespace']}_{meta['name']}_{container['name']}.log"
        workdir = container.get("workingDir") or str(self.state)
        started = now()
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        except OSError as exc:
            self.report(pod, {"terminated": {"exitCode": 128, "reason": "StartError",
                                             "message": str(exc), "startedAt": started,
                                             "finishedAt": now()}}, "Failed", None)
            return
        with self.lock:
            self.procs[meta["uid"]] = proc
            self.names[meta["uid"]] = (meta["namespace"], meta["name"])
        container_id = f"local-process://{proc.pid}"
        self.report(pod, {"running": {"startedAt": started}}, "Running", container_id)
        code = proc.wait()
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        with self.lock:
            self.procs.pop(meta["uid"], None)
            self.names.pop(meta["uid"], None)
        self.report(pod, {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": started, "finishedAt": now(), "containerID": container_id}},
            "Succeeded" if code == 0 else "Failed", container_id)

    def container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.state),
               "HOSTNAME": pod["metadata"]["name"], "LANG": "C.UTF-8"}
        image = container.get("image", "").rsplit(":", 1)[0] if "@" not in container.get(
            "image", "") else container["image"].split("@")[0]
        if image in self.images:
            env["PATH"] = f"{self.images[image]}:{env['PATH']}"
            env["VIRTUAL_ENV"] = str(Path(self.images[image]).parent)
        namespace = pod["metadata"]["namespace"]
        for source in container.get("envFrom") or []:
            for kind in ("secretRef", "configMapRef"):
                if kind in source:
                    env.update(self.lookup(namespace, kind, source[kind]["name"], None,
                                           source[kind].get("optional", False)))
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "valueFrom" in item:
                value = self.value_from(pod, item["valueFrom"])
                if value is not None:
                    env[item["name"]] = value
        return env

    def value_from(self, pod: dict[str, Any], source: dict[str, Any]) -> str | None:
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values: dict[str, str] = {"metadata.name": pod["metadata"]["name"],
                      "metadata.namespace": pod["metadata"]["namespace"],
                      "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": self.node,
                      "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                      "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "")}
            return values.get(field, "")
        for kind, ref in (("secretRef", source.get("secretKeyRef")),
                          ("configMapRef", source.get("configMapKeyRef"))):
            if ref:
                data = self.lookup(pod["metadata"]["namespace"], kind, ref["name"], ref["key"],
                                   ref.get("optional", False))
                return str(data[ref["key"]]) if ref["key"] in data else None
        return None

    def lookup(self, namespace: str, kind: str, name: str, key: str | None,
               optional: bool) -> dict[str, str]:
        what = "secrets" if kind == "secretRef" else "configmaps"
        response = self.http.get(f"/api/v1/namespaces/{namespace}/{what}/{name}")
        label = "secret" if kind == "secretRef" else "configmap"
        if response.status_code == 404:
            if optional:
                return {}
            raise ConfigError(f'{label} "{name}" not found')
        response.raise_for_status()
        data = response.json().get("data") or {}
        if kind == "secretRef":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        if key is not None and key not in data and not optional:
            raise ConfigError(f"couldn't find key {key} in {label} {namespace}/{name}")
        return dict(data)

    def report(self, pod: dict[str, Any], state: dict[str, Any], phase: str,
               container_id: str | None) -> None:
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        running = "running" in state
        status: dict[str, Any] = {"name": container["name"], "image": container["image"],
                                  "imageID": container["image"], "restartCount": 0,
                                  "ready": running, "started": running, "state": state}
        if container_id:
            status["containerID"] = container_id
        stamp = now()
        ready = "True" if running else "False"
        conditions = [{"type": t, "status": s, "lastTransitionTime": stamp} for t, s in (
            ("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", ready),
            ("Ready", ready))]
        body = {"status": {"phase": phase, "conditions": conditions, "hostIP": "127.0.0.1",
                           "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1",
                           "podIPs": [{"ip": "127.0.0.1"}],
                           "startTime": pod.get("status", {}).get("startTime") or stamp,
                           "containerStatuses": [status]}}
        with contextlib.suppress(httpx.HTTPError):  # a pod gone has nothing left to report to
            self._patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                        body)

    def kill(self, pod: dict[str, Any], grace: float) -> bool:
        """SIGTERM the pod's process group, SIGKILL after `grace` s; True once it is gone."""
        with self.lock:
            proc = self.procs.get(pod["metadata"]["uid"])
        if proc is None:
            return True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return True
            try:
                proc.wait(timeout=max(wait, 0.1))
                return True
            except subprocess.TimeoutExpired:
                continue
        return False

    def finish_delete(self, pod: dict[str, Any], grace: float) -> None:
        meta = pod["metadata"]
        self.kill(pod, grace)
        time.sleep(0.2)  # let run_pod report the exit code first
        self.http.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                          f"{meta['name']}", json={"gracePeriodSeconds": 0,
                                                   "preconditions": {"uid": meta["uid"]}})

    def _patch(self, path: str, body: dict[str, Any]) -> None:
        response = self.http.patch(path, content=json.dumps(body), headers={
            "Content-Type": "application/merge-patch+json"})
        response.raise_for_status()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(f"/api/v1/nodes/{self.node}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster-dir", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--image", action="append", default=[], metavar="IMAGE=BINDIR")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT")
    args = parser.parse_args()
    images = dict(item.split("=", 1) for item in args.image)
    labels = dict(item.split("=", 1) for item in args.label)
    taints = []
    for item in args.taint:
        pair, effect = item.rsplit(":", 1)
        key, _, value = pair.partition("=")
        taints.append({"key": key, "value": value, "effect": effect})
    args.state.mkdir(parents=True, exist_ok=True)
    node = LocalNode(args.cluster_dir, args.node, args.state, images, labels, taints)
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    node.register()
    threading.Thread(target=node.heartbeat, daemon=True).start()
    threading.Thread(target=node.watch_pods, daemon=True).start()
    print(f"node {args.node} ready", flush=True)
    while not node.stopping.wait(1):
        pass
    node.stop()


if __name__ == "__main__":
    main()
