"""The Docker backend against a real Docker engine and a real Prefect server.

Images are built locally by scripts/build-test-images.sh (no registry is reachable): a busybox
image whose `engine` script reports states with wget, and for one test an image with Python and
prefect 3.8.8. Containers use host networking and talk to the server on loopback only.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import docker
import docker.errors
import pytest
import structlog

from flowhand.api.client import PrefectClient
from flowhand.backends.base import Handle, Job
from flowhand.backends.docker import (
    DockerBackend,
    DockerHandle,
    DockerJobConfig,
    container_name,
    docker_labels,
    parse_volume,
    plan_network,
    pull_policy,
)
from flowhand.config import Config, create_backend
from flowhand.errors import BackendUnavailable
from flowhand.jobs import JobBuilder
from flowhand.worker import Worker
from tests.helpers import BUILD_SCRIPT, BUSYBOX, busybox_vars, events
from tests.prefect_env import API, REPO, PrefectServer, skip_or_fail

pytestmark = pytest.mark.docker

PREFECT_IMAGE = "flowhand-test/prefect:3.8.8"
PID_RE = re.compile(r"^http\+docker://localhost:[0-9a-f]{64}$")
MakeConfig = Callable[..., Config]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_image(docker_client: docker.DockerClient) -> str:
    result = subprocess.run([str(BUILD_SCRIPT), "--python"], capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        skip_or_fail(f"cannot build {PREFECT_IMAGE} (needs debootstrap and PyPI): {tail}")
    return PREFECT_IMAGE


@pytest.fixture
def pool(api: API, docker_client: docker.DockerClient, busybox: str) -> Iterator[str]:
    """A docker pool (the worker fills in its template); its containers are removed after."""
    name = api.create_pool(type="docker")
    yield name
    for container in docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.work-pool-name={name}"}
    ):
        container.remove(force=True)


def run_pass(
    make_config: MakeConfig, pool: str, **overrides: Any
) -> tuple[list[dict[str, Any]], int]:
    """One worker pass with the docker backend; (log events, peak thread count during it)."""
    config = make_config(pool, type="docker", **overrides)
    peak = threading.active_count()

    async def main() -> None:
        nonlocal peak

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, threading.active_count())
                await anyio.sleep(0.02)

        async with PrefectClient(config.api.url, worker_name=config.name,
                                 retry_base_seconds=0.05) as client:
            backend = create_backend(DockerBackend, config)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sample)
                    await Worker(config, client, backend).run(run_once=True)
                    tg.cancel_scope.cancel()
            finally:
                await backend.aclose()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    return logs, peak


async def build_job(client: PrefectClient, config: Config, backend: DockerBackend,
                    run_id: str) -> Job:
    flow_run = await client.read_flow_run(uuid.UUID(run_id))
    assert flow_run.deployment_id is not None
    deployment = await client.read_deployment(flow_run.deployment_id)
    assert config.pool is not None
    work_pool = await client.read_work_pool(config.pool)
    return await JobBuilder(config, client, backend).build(flow_run, deployment, work_pool)


# -- end to end through the worker ------------------------------------------------------------


def test_container_run_completes_and_is_identified(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch, prefect_server: PrefectServer,
) -> None:
    """A container reports RUNNING then COMPLETED through the API, carries Prefect's labels and
    name, gets only the run's environment, and its infrastructure_pid is Prefect's format."""
    monkeypatch.setenv("FLOWHAND_TEST_WORKER_ONLY", "must-not-leak")
    dep = api.create_deployment(pool, busybox_vars("engine --print hello-from-container",
                                                   env={"GREETING": "hi"}))
    run_id = api.create_run(dep, name="Happy Run #1 (é)")

    logs, _ = run_pass(make_config, pool)

    run = api.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "RUNNING" in [s["type"] for s in api.history(run_id)]
    pid = run["infrastructure_pid"]
    assert PID_RE.match(pid), pid
    assert events(logs, "flow_run.started", infrastructure_pid=pid)
    assert events(logs, "docker.container_exited", status_code=0, oom=False)

    container = docker_client.containers.get(pid.rsplit(":", 1)[1])
    labels = container.labels
    assert labels["io.prefect.flow-run-id"] == run_id
    assert labels["io.prefect.flow-run-name"] == "Happy Run #1 (é)"
    assert labels["io.prefect.deployment-id"] == dep
    assert labels["io.prefect.work-pool-name"] == pool
    assert labels["io.prefect.worker-name"] == "test-worker"
    assert labels["io.prefect.version"] == "3.8.8"
    assert container.name == "Happy-Run-1-e"
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["AutoRemove"] is False
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert env["PREFECT__FLOW_RUN_ID"] == run_id
    assert env["PREFECT_API_URL"] == prefect_server.api_url  # host network: not rewritten
    assert env["GREETING"] == "hi"
    assert "FLOWHAND_TEST_WORKER_ONLY" not in env
    assert not [k for k in os.environ if k in env and k not in ("PATH",)
                and not k.startswith("PREFECT")]


def test_nonzero_exit_crashes_with_the_output_tail(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Exit 3 ends CRASHED with the code explained and the container's last lines in the state
    message and the run's logs, streamed or not; the exited container is left in place."""
    command = "engine --state none --exit 3 --print {}"
    streamed = api.create_run(api.create_deployment(
        pool, busybox_vars(command.format("boom-streamed"))))
    quiet = api.create_run(api.create_deployment(
        pool, busybox_vars(command.format("boom-quiet"), stream_output=False)))

    logs, _ = run_pass(make_config, pool)

    for run_id, line in ((streamed, "boom-streamed"), (quiet, "boom-quiet")):
        state = api.state(run_id)
        assert state["type"] == "CRASHED", state
        assert "non-zero status code 3" in state["message"]
        assert "Last output lines:\n" + line in state["message"], state["message"]
        assert any(line in entry["message"] and "status code 3" in entry["message"]
                   for entry in api.logs(run_id))
        container = docker_client.containers.get(api.flow_run(run_id)["infrastructure_pid"]
                                                 .rsplit(":", 1)[1])
        assert container.status == "exited"
        assert container.attrs["State"]["ExitCode"] == 3
    out = capfd.readouterr().out
    assert "boom-streamed" in out
    assert "boom-quiet" not in out
    assert len(events(logs, "flow_run.crashed", status_code=3)) == 2


def test_oom_killed_container_is_reported_as_out_of_memory(
    api: API, pool: str, make_config: MakeConfig,
) -> None:
    """A container killed by the OOM killer under mem_limit ends CRASHED as out of memory,
    naming the limit, with or without auto_remove."""
    fill = "sh -c 'echo filling; x=$(head -c 200000000 /dev/zero | tr \"\\0\" a)'"
    limits = {"mem_limit": "16m", "memswap_limit": "16m"}
    kept = api.create_run(api.create_deployment(pool, busybox_vars(fill, **limits)))
    # With auto_remove the OOMKilled flag may vanish with the container: the oom event tells.
    removed = api.create_run(api.create_deployment(
        pool, busybox_vars(fill, auto_remove=True, **limits)))

    logs, _ = run_pass(make_config, pool)

    for run_id in (kept, removed):
        state = api.state(run_id)
        assert state["type"] == "CRASHED", state
        message = state["message"]
        assert "non-zero status code 137" in message
        assert "ran out of memory" in message and "mem_limit=16m, memswap_limit=16m" in message
        assert "filling" in message
    assert len(events(logs, "docker.container_exited", status_code=137, oom=True)) == 2


def test_launch_failures_crash_the_run_and_the_pass_goes_on(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A missing image under Never, a failed login or pull (the password never shown), an
    invalid volume, a missing network, a command missing from the image and bad
    container_create_kwargs each end CRASHED with an
    actionable reason, while healthy runs in the same pass complete; registry login happens
    only when a pull is needed, and IfPossible falls back to the local image."""
    secret = "s3cret-never-logged-" + uuid.uuid4().hex
    cases = {
        "missing_image": (
            {"image": "flowhand-test/does-not-exist:1"},
            ["image 'flowhand-test/does-not-exist:1' is not present on the Docker host",
             "IfNotPresent"]),
        "pull_failure": (
            {"image": "127.0.0.1:9/flowhand/nothing:1", "image_pull_policy": "IfNotPresent",
             "registry_credentials": {"username": "robot", "password": secret,
                                      "registry_url": "127.0.0.1:9"}},
            ["cannot log in to registry '127.0.0.1:9' as 'robot'"]),
        "pull_failure_no_login": (
            {"image": "127.0.0.1:9/flowhand/nothing:1", "image_pull_policy": "Always"},
            ["cannot pull image '127.0.0.1:9/flowhand/nothing:1'"]),
        "bad_volume": (
            {"volumes": ["data:relative/path"]},
            ["invalid volume", "must be absolute"]),
        "missing_network": (
            {"network_mode": None, "networks": ["flowhand-test-no-such-network"]},
            ["network flowhand-test-no-such-network not found", "docker network create"]),
        "missing_command": (
            {"command": "no-such-binary --flag"},
            ["cannot start the container", "no-such-binary", "executable file not found"]),
        "bad_create_kwargs": (
            {"container_create_kwargs": {"no_such_option": 1}},
            ["invalid container_create_kwargs", "no_such_option"]),
    }
    runs = {}
    for case, (variables, _) in cases.items():
        job_vars = {**busybox_vars("engine"), **variables}
        job_vars = {k: v for k, v in job_vars.items() if v is not None}
        runs[case] = api.create_run(api.create_deployment(pool, job_vars))
    # Present locally: no pull, so no login, although credentials are given.
    healthy = api.create_run(api.create_deployment(pool, busybox_vars(
        "engine", image_pull_policy="IfNotPresent",
        registry_credentials={"username": "robot", "password": secret,
                              "registry_url": "127.0.0.1:9"})))
    # IfPossible: the pull fails (nothing listens on 127.0.0.1:9), the local copy is used.
    local_tag = "127.0.0.1:9/flowhand/busybox:1"
    docker_client.images.get(BUSYBOX).tag(local_tag)
    fallback = api.create_run(api.create_deployment(pool, busybox_vars(
        "engine", image=local_tag, image_pull_policy="IfPossible")))

    try:
        logs, _ = run_pass(make_config, pool)
    finally:
        docker_client.images.remove(local_tag)

    assert api.state(healthy)["type"] == "COMPLETED"
    assert api.state(fallback)["type"] == "COMPLETED"
    assert events(logs, "docker.pull_failed_using_local", image=local_tag)
    for case, (_, needles) in cases.items():
        state = api.state(runs[case])
        assert state["type"] == "CRASHED", (case, state)
        assert state["message"].startswith("Failed to submit flow run to infrastructure: "
                                           "LaunchFailed: "), state["message"]
        for needle in needles:
            assert needle in state["message"], (case, state["message"])
    # Created (and recorded) but unable to start: removed, not left behind.
    missing_command_pid = api.flow_run(runs["missing_command"])["infrastructure_pid"]
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(missing_command_pid.rsplit(":", 1)[1])
    assert len(events(logs, "docker.registry_login", registry="127.0.0.1:9",
                      username="robot")) == 1
    captured = capfd.readouterr()
    assert secret not in repr(logs) + captured.out + captured.err
    assert all(secret not in entry["message"] for entry in api.logs(runs["pull_failure"]))


def test_auto_remove_is_honoured(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
) -> None:
    """With auto_remove the container is gone after the run, and a non-zero exit code is still
    reported (from the die event when inspect comes too late)."""
    ok = api.create_run(api.create_deployment(pool, busybox_vars("engine", auto_remove=True)))
    failing = api.create_run(api.create_deployment(
        pool, busybox_vars("engine --state none --exit 5", auto_remove=True,
                           stream_output=False)))

    run_pass(make_config, pool)

    assert api.state(ok)["type"] == "COMPLETED"
    state = api.state(failing)
    assert state["type"] == "CRASHED" and "non-zero status code 5" in state["message"], state
    deadline = time.monotonic() + 10
    for run_id in (ok, failing):
        container_id = api.flow_run(run_id)["infrastructure_pid"].rsplit(":", 1)[1]
        while True:
            try:
                docker_client.containers.get(container_id)
            except docker.errors.NotFound:
                break
            assert time.monotonic() < deadline, "auto_remove container still exists"
            time.sleep(0.1)


def test_container_names_get_a_suffix_on_conflict(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
) -> None:
    """Runs whose container names collide get `name-1`, `name-2`, as in Prefect."""
    dep = api.create_deployment(pool, busybox_vars("engine", name="same-name"))
    run_ids = [api.create_run(dep) for _ in range(3)]

    run_pass(make_config, pool)

    names = sorted(
        docker_client.containers.get(api.flow_run(r)["infrastructure_pid"].rsplit(":", 1)[1]).name
        for r in run_ids
    )
    assert names == ["same-name", "same-name-1", "same-name-2"]
    assert {api.state(r)["type"] for r in run_ids} == {"COMPLETED"}


def test_fifty_containers_complete_with_a_flat_thread_count(
    api: API, pool: str, make_config: MakeConfig,
) -> None:
    """Fifty containers at once all complete while the worker's thread count stays small: exits
    come from one event stream, not a thread per container."""
    dep = api.create_deployment(pool, busybox_vars("engine --sleep 4 --print working"))
    run_ids = [api.create_run(dep) for _ in range(50)]
    baseline = threading.active_count()

    started = time.monotonic()
    logs, peak = run_pass(make_config, pool)
    elapsed = time.monotonic() - started

    states = {run_id: api.state(run_id)["type"] for run_id in run_ids}
    assert set(states.values()) == {"COMPLETED"}, states
    assert len(events(logs, "docker.container_exited", status_code=0)) == 50
    # 8 Docker API threads + the event watcher + asyncio's resolver pool, whatever the count.
    assert peak < 20, f"peak {peak} threads (baseline {baseline}) for 50 containers"
    assert elapsed < 120


def test_unreachable_daemon_claims_nothing(
    api: API, pool: str, make_config: MakeConfig,
) -> None:
    """With the Docker daemon unreachable, check() raises BackendUnavailable and the serving
    worker backs off without claiming: the run stays SCHEDULED."""
    socket = "/nonexistent/flowhand-docker.sock"
    config = make_config(pool, type="docker", docker={"base_url": f"unix://{socket}"})
    run_id = api.create_run(api.create_deployment(pool, busybox_vars("engine")))

    async def main() -> None:
        async with PrefectClient(config.api.url, worker_name=config.name,
                                 retry_base_seconds=0.05) as client:
            backend = create_backend(DockerBackend, config)
            with pytest.raises(BackendUnavailable, match=re.escape(socket)):
                await backend.check()
            worker = Worker(config, client, backend)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(2.0)
                worker.stop()
            await backend.aclose()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)

    failed = events(logs, "poll.failed")
    assert failed and socket in failed[0]["error"], failed
    assert not events(logs, "flow_run.claimed")
    assert api.state(run_id)["type"] == "SCHEDULED"


def test_container_wait_timeout_stops_watching_without_stopping(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
) -> None:
    """After container_wait_timeout the worker stops watching: the container keeps running and
    the run is not crashed by the worker."""
    dep = api.create_deployment(pool, busybox_vars("sleep 30", container_wait_timeout=1))
    run_id = api.create_run(dep)

    started = time.monotonic()
    logs, _ = run_pass(make_config, pool)

    assert time.monotonic() - started < 20
    assert events(logs, "flow_run.unwatched")
    assert api.state(run_id)["type"] == "PENDING"
    container = docker_client.containers.get(api.flow_run(run_id)["infrastructure_pid"]
                                             .rsplit(":", 1)[1])
    assert container.status == "running"


def test_api_url_is_rewritten_off_the_host_network(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
    prefect_server: PrefectServer,
) -> None:
    """Off the host network, the loopback API URL is rewritten to the configured host and
    host.docker.internal is mapped to the host gateway, merged with container_create_kwargs
    (checked by inspect; the container makes no request)."""
    variables = busybox_vars("true", container_create_kwargs={
        "working_dir": "/tmp", "extra_hosts": {"example.invalid": "127.0.0.1"},
        "image": "ignored/because-a-job-variable-wins"})
    del variables["network_mode"]
    run_id = api.create_run(api.create_deployment(pool, variables))

    run_pass(make_config, pool, docker={"api_url_rewrite": "host.docker.internal"})

    state = api.state(run_id)
    assert state["type"] == "CRASHED" and "status code 0 without reporting" in state["message"]
    container = docker_client.containers.get(api.flow_run(run_id)["infrastructure_pid"]
                                             .rsplit(":", 1)[1])
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    port = prefect_server.api_url.split(":")[2].split("/")[0]
    assert env["PREFECT_API_URL"] == f"http://host.docker.internal:{port}/api"
    assert sorted(container.attrs["HostConfig"]["ExtraHosts"]) == [
        "example.invalid:127.0.0.1", "host.docker.internal:host-gateway"]
    assert container.attrs["Config"]["WorkingDir"] == "/tmp"
    assert container.attrs["Config"]["Image"] == BUSYBOX
    assert container.attrs["HostConfig"]["NetworkMode"] in ("default", "bridge")


def test_real_prefect_flow_runs_in_a_container(
    api: API, pool: str, make_config: MakeConfig, prefect_image: str,
) -> None:
    """A real @flow runs under `prefect flow-run execute` in a container and COMPLETES, its
    logs reaching the API."""
    dep = api.create_deployment(
        pool,
        {"image": prefect_image, "image_pull_policy": "Never", "network_mode": "host",
         "volumes": [f"{REPO / 'tests' / 'flows'}:/flows:ro"]},
        flow_name="hello",
        entrypoint="hello.py:hello",
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/flows"}}],
        parameters={"name": "container"},
    )
    run_id = api.create_run(dep)

    logs, _ = run_pass(make_config, pool)

    state = api.state(run_id)
    assert state["type"] == "COMPLETED", (state, [e for e in logs if "crash" in e["event"]])
    assert any("hello, container!" in entry["message"] for entry in api.logs(run_id))


# -- the backend directly: identity, kill, reattach -------------------------------------------


def test_kill_and_reattach_check_identity(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
) -> None:
    """The pid is recorded while the container is created but not started; reattach and kill
    act only on a container of this engine labelled with the run; kill stops politely, then
    forces after the grace period."""
    polite = "sh -c 'trap \"echo got-term; exit 143\" TERM; while true; do sleep 0.1; done'"
    stubborn = "sleep 600"  # PID 1 without a handler: SIGTERM does nothing
    polite_run = api.create_run(api.create_deployment(pool, busybox_vars(polite)))
    stubborn_run = api.create_run(api.create_deployment(pool, busybox_vars(stubborn)))
    config = make_config(pool, type="docker")
    statuses_at_record: list[str] = []

    async def main() -> None:
        async with PrefectClient(config.api.url, worker_name=config.name) as client:
            backend = create_backend(DockerBackend, config)

            async def record_pid(pid: str) -> None:
                statuses_at_record.append(
                    docker_client.api.inspect_container(pid.rsplit(":", 1)[1])["State"]["Status"]
                )

            handles: dict[str, Handle] = {}
            for run_id in (polite_run, stubborn_run):
                job = await build_job(client, config, backend, run_id)
                handles[run_id] = await backend.start(job, record_pid)
            await backend.aclose()

            # A new backend, as after a worker restart.
            backend = create_backend(DockerBackend, config)
            try:
                for run_id, handle in handles.items():
                    pid = handle.infrastructure_pid
                    container_id = pid.rsplit(":", 1)[1]
                    assert await backend.reattach(pid, uuid.uuid4()) is None
                    assert await backend.reattach(f"tcp://10.9.9.9:2375:{container_id}",
                                                  uuid.UUID(run_id)) is None
                    assert await backend.reattach(f"http+docker://localhost:{'0' * 64}",
                                                  uuid.UUID(run_id)) is None
                    found = await backend.reattach(pid, uuid.UUID(run_id))
                    assert isinstance(found, DockerHandle)
                    assert found.container_id == container_id
                    handles[run_id] = found

                # Not this run's container: left alone.
                stranger = DockerHandle(
                    infrastructure_pid=handles[polite_run].infrastructure_pid,
                    flow_run_id=uuid.uuid4(),
                    container_id=handles[polite_run].infrastructure_pid.rsplit(":", 1)[1],
                )
                await backend.kill(stranger, grace_seconds=0)
                polite_id = stranger.container_id
                assert docker_client.api.inspect_container(polite_id)["State"]["Running"]

                started = time.monotonic()
                await backend.kill(handles[polite_run], grace_seconds=10)
                polite_exit = await backend.wait(handles[polite_run])
                assert polite_exit.status_code == 143
                assert time.monotonic() - started < 5

                started = time.monotonic()
                await backend.kill(handles[stubborn_run], grace_seconds=1.5)
                stubborn_exit = await backend.wait(handles[stubborn_run])
                assert stubborn_exit.status_code == 137
                assert stubborn_exit.explanation is None  # killed, not out of memory
                assert 1.5 <= time.monotonic() - started < 10

                # Gone already is not an error.
                await backend.kill(handles[stubborn_run], grace_seconds=1)
            finally:
                await backend.aclose()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    assert statuses_at_record == ["created", "created"]
    assert events(logs, "docker.not_ours")
    assert events(logs, "docker.container_force_kill")


def test_exit_before_wait_is_not_lost(
    api: API, pool: str, make_config: MakeConfig, docker_client: docker.DockerClient,
) -> None:
    """A container that exits and is removed before wait() is called still reports its exit
    code (from the die event the watcher saw)."""
    run_id = api.create_run(api.create_deployment(
        pool, busybox_vars("sh -c 'exit 7'", auto_remove=True, stream_output=False)))
    config = make_config(pool, type="docker")

    async def main() -> None:
        async with PrefectClient(config.api.url, worker_name=config.name) as client:
            backend = create_backend(DockerBackend, config)
            try:
                job = await build_job(client, config, backend, run_id)

                async def record_pid(pid: str) -> None:
                    pass

                handle = await backend.start(job, record_pid)
                assert isinstance(handle, DockerHandle)
                deadline = time.monotonic() + 10
                container = docker_client.containers.get(handle.container_id)
                while container.status != "exited":
                    assert time.monotonic() < deadline
                    await anyio.sleep(0.05)
                    container.reload()
                # Gone before anyone waited (removed by hand here): only the event tells.
                container.remove()
                exit_ = await backend.wait(handle)
                assert exit_.status_code == 7
            finally:
                await backend.aclose()

    with structlog.testing.capture_logs() as logs:
        anyio.run(main)
    assert events(logs, "docker.container_exited", status_code=7, removed=True)


# -- rules that need no daemon ------------------------------------------------------------------


def test_network_plan_follows_prefect() -> None:
    """Loopback API on Linux means host networking; with networks the URL goes to
    host.docker.internal mapped to host-gateway; 'never' and explicit URLs are left alone."""
    env = {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "X": "1"}

    plan = plan_network(DockerJobConfig(), env, "auto", platform="linux")
    assert (plan.network_mode, plan.env, plan.extra_hosts) == ("host", env, {})

    plan = plan_network(DockerJobConfig(networks=["n1"]), env, "auto", platform="linux")
    assert plan.network_mode is None
    assert plan.env["PREFECT_API_URL"] == "http://host.docker.internal:4200/api"
    assert plan.extra_hosts == {"host.docker.internal": "host-gateway"}

    plan = plan_network(DockerJobConfig(), env, "auto", platform="darwin")
    assert plan.network_mode is None and plan.extra_hosts == {}
    assert plan.env["PREFECT_API_URL"] == "http://host.docker.internal:4200/api"

    plan = plan_network(DockerJobConfig(), env, "never", platform="linux")
    assert (plan.network_mode, plan.env, plan.extra_hosts) == (None, env, {})

    plan = plan_network(DockerJobConfig(network_mode="bridge"), env, "gateway.local",
                        platform="linux")
    assert plan.env["PREFECT_API_URL"] == "http://gateway.local:4200/api"
    assert plan.extra_hosts == {}

    own = {"PREFECT_API_URL": "http://localhost:4200/api"}
    plan = plan_network(DockerJobConfig(network_mode="bridge", env=own), own, "auto",
                        platform="linux")
    assert plan.env == own

    remote = {"PREFECT_API_URL": "https://api.prefect.cloud/api/accounts/a/workspaces/w"}
    plan = plan_network(DockerJobConfig(), remote, "auto", platform="linux")
    assert (plan.network_mode, plan.env, plan.extra_hosts) == (None, remote, {})


def test_naming_labels_pull_policy_and_volumes() -> None:
    """Container names, labels, the default pull policy and volume checks follow Prefect."""
    assert container_name("crimson-otter") == "crimson-otter"
    assert container_name("_-.My Run: #2!") == "My-Run-2"
    assert container_name("日本") is None
    assert container_name("a" * 300) == "a" * 250
    assert docker_labels({"prefect.io/flow-run-id": "x", "my.org/team": "t", "plain": "p"}) == {
        "io.prefect.flow-run-id": "x", "org.my.team": "t", "plain": "p",
        "io.prefect.version": "3.8.8",
    }
    assert pull_policy("busybox", None) == "Always"
    assert pull_policy("busybox:latest", None) == "Always"
    assert pull_policy("localhost:5000/busybox", None) == "Always"
    assert pull_policy("busybox:1.36", None) == "IfNotPresent"
    assert pull_policy("busybox@sha256:" + "a" * 64, None) == "IfNotPresent"
    assert pull_policy("busybox:latest", "Never") == "Never"
    assert parse_volume("/data", "/w") == (None, "/data", None)
    assert parse_volume("./src:/app:ro", "/w") == ("/w/src", "/app", "ro")
    assert parse_volume("cache:/cache", "/w") == ("cache", "/cache", None)
    for bad in ("data", "a/b:/x", "/x:rel", "/x:/y:bogus", "/a:/b:/c:ro", ":/x"):
        with pytest.raises(ValueError):
            parse_volume(bad, "/w")

