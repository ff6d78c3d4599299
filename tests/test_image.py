"""The container image: built from the project's Dockerfile, run against a real Prefect server.

No registry is reachable, so the base is made locally (scripts/build-test-images.sh
--python-base: a debootstrapped Debian with python3, standing in for python:3.11-slim) and the
build uses host networking for apt and pip. The image has no Prefect: process-backend runs
execute the stand-in engine (stdlib only) mounted read-only at /engine/engine.py, and
Docker-backend runs are busybox containers started through the mounted Docker socket. The worker
containers use host networking and reach the server on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from tests.prefect_env import API, ENGINE, FINAL, REPO, PrefectServer, skip_or_fail
from tests.waiting import wait_for

pytestmark = pytest.mark.docker

IMAGE = "flowhand-test/flowhand:dev"
BASE_IMAGE = "flowhand-test/python-base:bookworm"
BUSYBOX = "flowhand-test/busybox:1"
BUILD_SCRIPT = REPO / "scripts" / "build-test-images.sh"
DOCKER_SOCKET = "/var/run/docker.sock"
TEST_LABEL = "flowhand.test.image"
PID_RE = re.compile(r"^http\+docker://localhost:[0-9a-f]{64}$")
StartWorker = Callable[..., Container]


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def worker_logs(container: Container) -> str:
    return str(container.logs(stdout=True, stderr=True).decode(errors="replace"))


def worker_events(container: Container) -> list[dict[str, Any]]:
    out = []
    for line in container.logs(stdout=False, stderr=True).decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_until(predicate: Callable[[], bool], container: Container, what: str,
               timeout: float = 90) -> None:
    wait_for(predicate, timeout, what, interval=0.3,
             details=lambda: f"worker output:\n{tail(worker_logs(container))}")


def processes(container: Container) -> list[tuple[int, str, str, int]]:
    """(pid, comm, state, ppid) of every process in the container."""
    result = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"])
    out = []
    for line in result.output.decode(errors="replace").splitlines():
        head, _, rest = line.rpartition(")")
        pid, _, comm = head.partition(" (")
        fields = rest.split()
        out.append((int(pid), comm, fields[0], int(fields[1])))
    return out


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(docker_client: docker.DockerClient) -> str:
    """The project's Dockerfile built on the locally made base (layers cached between runs)."""
    base = subprocess.run([str(BUILD_SCRIPT), "--python-base"], capture_output=True, text=True,
                          timeout=1800)
    if base.returncode != 0:
        skip_or_fail(f"cannot build the base image {BASE_IMAGE} (needs debootstrap and a Debian "
                    f"mirror): {tail(base.stdout + base.stderr, 15)}")
    try:
        previous: str | None = docker_client.images.get(IMAGE).id
    except docker.errors.ImageNotFound:
        previous = None
    build = subprocess.run(
        ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
         "-t", IMAGE, str(REPO)],
        capture_output=True, text=True, timeout=1800,
    )
    assert build.returncode == 0, f"docker build failed:\n{tail(build.stdout + build.stderr)}"
    if previous and previous != docker_client.images.get(IMAGE).id:
        # Rebuilt after a source change: the replaced image (its ~40 MB venv) is garbage now.
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(previous)
    return IMAGE


@pytest.fixture
def start_worker(
    docker_client: docker.DockerClient, image: str, prefect_server: PrefectServer,
) -> Iterator[StartWorker]:
    """Start a worker container from the image (host network, the engine mounted); removed after."""
    started: list[Container] = []

    def start(*args: str, env: dict[str, str] | None = None,
              volumes: dict[str, dict[str, str]] | None = None, **kwargs: Any) -> Container:
        container = docker_client.containers.run(
            image, list(args), detach=True, network_mode="host", labels={TEST_LABEL: "1"},
            environment={"PREFECT_API_URL": prefect_server.api_url,
                         "FLOWHAND_LOGGING__FORMAT": "json", **(env or {})},
            volumes={str(ENGINE): {"bind": "/engine/engine.py", "mode": "ro"},
                     **(volumes or {})},
            **kwargs,
        )
        started.append(container)
        return container

    yield start
    for container in started:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)


def wait_runs_final(api: API, run_ids: list[str], container: Container,
                    timeout: float = 90) -> dict[str, dict[str, Any]]:
    wait_until(lambda: all(api.state(r)["type"] in FINAL for r in run_ids), container,
               f"{len(run_ids)} runs to finish", timeout)
    return {r: api.state(r) for r in run_ids}


# -- tests -------------------------------------------------------------------------------------


def test_process_backend_from_etc_config_runs_as_non_root_under_tini(
    api: API, start_worker: StartWorker, tmp_path: Path,
) -> None:
    """Configured only by /etc/flowhand/worker.toml, the image's worker runs process-backend runs to COMPLETED as uid 10001 under tini (PID 1), which reaps what runs orphan, with a read-only root file system and no capabilities (as deploy/kubernetes.yaml runs it)."""
    pool = api.create_pool()
    # Each run leaves an orphan behind: without an init reaping it, it would stay a zombie.
    dep = api.create_deployment(pool, job_variables={
        "command": "sh -c '(sleep 0.5 &); exec python3 /engine/engine.py --print ran-in-image'"})
    run_ids = [api.create_run(dep) for _ in range(3)]
    config = tmp_path / "worker.toml"
    config.write_text(f'pool = "{pool}"\nname = "image-process"\npoll_interval_seconds = 0.3\n')
    config.chmod(0o644)

    worker = start_worker(
        volumes={str(config): {"bind": "/etc/flowhand/worker.toml", "mode": "ro"}},
        read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
        tmpfs={"/tmp": "", "/var/lib/flowhand": "uid=10001,gid=10001,mode=0750"},
    )
    states = wait_runs_final(api, run_ids, worker)

    assert {s["type"] for s in states.values()} == {"COMPLETED"}, states
    for run_id in run_ids:
        run = api.flow_run(run_id)
        assert run["infrastructure_pid"].split(":")[-1].isdigit(), run["infrastructure_pid"]
        assert run["labels"].get("prefect.worker.name") == "image-process", run["labels"]
    assert "ran-in-image" in worker_logs(worker)  # stream_output reaches `docker logs`
    assert worker.exec_run(["id", "-u"]).output.decode().strip() == "10001"
    procs = processes(worker)
    assert (1, "tini") in [(pid, comm) for pid, comm, _, _ in procs], procs
    assert [ppid for _, comm, _, ppid in procs if comm == "flowhand"] == [1], procs
    deadline = time.monotonic() + 15
    while [p for p in processes(worker) if p[1] == "sleep"]:
        assert time.monotonic() < deadline, f"orphans not reaped: {processes(worker)}"
        time.sleep(0.3)
    worker.reload()
    assert worker.status == "running", tail(worker_logs(worker))


def test_docker_backend_runs_containers_through_the_mounted_socket(
    api: API, start_worker: StartWorker, docker_client: docker.DockerClient,
) -> None:
    """With the host's Docker socket mounted and its group added, the image's non-root worker runs Docker-backend runs as sibling containers to COMPLETED."""
    if not os.path.exists(DOCKER_SOCKET):
        pytest.skip(f"the Docker engine is not at {DOCKER_SOCKET}")
    pool = api.create_pool(type="docker")
    dep = api.create_deployment(pool, job_variables={
        "image": BUSYBOX, "image_pull_policy": "Never", "network_mode": "host",
        "command": "engine --print from-a-sibling-container"})
    run_ids = [api.create_run(dep) for _ in range(2)]
    name = f"image-docker-{uuid.uuid4().hex[:6]}"
    try:
        worker = start_worker(
            "--pool", pool, "--name", name, env={"FLOWHAND_POLL_INTERVAL_SECONDS": "0.3"},
            volumes={DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"}},
            group_add=[str(os.stat(DOCKER_SOCKET).st_gid)],
        )
        states = wait_runs_final(api, run_ids, worker)

        assert {s["type"] for s in states.values()} == {"COMPLETED"}, (
            states, tail(worker_logs(worker)))
        for run_id in run_ids:
            pid = api.flow_run(run_id)["infrastructure_pid"]
            assert PID_RE.match(pid), pid
            container = docker_client.containers.get(pid.rsplit(":", 1)[1])
            assert container.labels["io.prefect.worker-name"] == name
            assert container.labels["io.prefect.flow-run-id"] == run_id
        assert "from-a-sibling-container" in worker_logs(worker)
        assert worker.exec_run(["id", "-u"]).output.decode().strip() == "10001"
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"io.prefect.work-pool-name={pool}"}
        ):
            container.remove(force=True)


def test_docker_stop_drains_the_run_in_flight_then_exits_0(
    api: API, start_worker: StartWorker, docker_client: docker.DockerClient,
) -> None:
    """`docker stop` (SIGTERM, the image's STOPSIGNAL) with shutdown.mode = drain lets the run in flight complete before the container exits, with status 0."""
    assert docker_client.images.get(IMAGE).attrs["Config"]["StopSignal"] == "SIGTERM"
    pool = api.create_pool()
    dep = api.create_deployment(pool, job_variables={
        "command": "python3 /engine/engine.py --sleep 6"})
    run_id = api.create_run(dep)
    worker = start_worker(
        "--pool", pool, "--name", "image-drain",
        env={"FLOWHAND_POLL_INTERVAL_SECONDS": "0.3", "FLOWHAND_SHUTDOWN__MODE": "drain",
             "FLOWHAND_SHUTDOWN__GRACE_SECONDS": "60"},
    )
    wait_until(lambda: api.state(run_id)["type"] == "RUNNING", worker, "the run to be RUNNING")

    started = time.monotonic()
    worker.stop(timeout=120)  # SIGKILL only after 120 s: the drain must end well before
    elapsed = time.monotonic() - started

    worker.reload()
    logs = worker_logs(worker)
    assert worker.status == "exited"
    assert worker.attrs["State"]["ExitCode"] == 0, tail(logs)
    assert not worker.attrs["State"]["OOMKilled"]
    # Had the container exited with the run in flight, the run's process would have died with
    # it and the run would still be RUNNING: it completed, so the worker waited for it.
    assert api.state(run_id)["type"] == "COMPLETED", (api.state(run_id), tail(logs))
    assert 2 < elapsed < 60, elapsed
    events = worker_events(worker)
    names = [e["event"] for e in events]
    assert "worker.draining" in names and "worker.stopped" in names, names
    assert "worker.detaching" not in names and "worker.rescheduling" not in names, names
