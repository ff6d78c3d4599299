"""The Docker backend: start, wait, kill and reattach containers on one Docker engine."""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import (
    Backend,
    BackendContext,
    Exit,
    Handle,
    Job,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.backends.docker.client import Engine
from flowhand.backends.docker.create_body import create_request
from flowhand.backends.docker.daemon import Daemon
from flowhand.backends.docker.errors import DOCKER_ERRORS, explain, flowhand_error
from flowhand.backends.docker.exits import Ended, inspect, wait_ended
from flowhand.backends.docker.images import ensure_image
from flowhand.backends.docker.logs import ContainerLogs
from flowhand.backends.docker.settings import DockerJobConfig, DockerSettings
from flowhand.backends.docker.spec import (
    AUTO_REMOVE_LABEL,
    FLOW_RUN_LABEL,
    container_settings,
    format_bytes,
    oom_message,
)
from flowhand.backends.docker.streams import APIError, NotFound
from flowhand.backends.output import OutputPump
from flowhand.errors import BackendUnavailable, InfrastructureError, LaunchFailed

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

#: A successful ping is trusted this long, so `check()` before every poll costs nothing.
PING_CACHE_SECONDS = 2.0
#: Streamed output is fetched again after this many seconds, doubling up to the maximum while the
#: container is quiet.
STREAM_MIN_SECONDS = 0.5
STREAM_MAX_SECONDS = 10.0


@dataclass
class DockerHandle(Handle):
    container_id: str = ""
    name: str | None = None
    stream_output: bool = False
    mem_limit: str | None = None
    memswap_limit: str | None = None
    wait_timeout: float | None = None
    #: auto_remove, done by flowhand after it has read the exit code and the output: Docker's
    #: own AutoRemove races `inspect` and `logs` and can take a crash's last lines with it.
    remove_on_exit: bool = False
    #: Receives output lines for the run's logs (`[run_logs] forward_output`).
    sink: OutputSink | None = field(default=None, repr=False)
    #: Started by this process, after the event stream was up: its `die` cannot be missed.
    started_here: bool = False
    #: The container has a TTY: its logs come without the stream framing.
    tty: bool = False


class DockerBackend(Backend):
    """Start each run as a container on one Docker engine."""

    pool_type: ClassVar[str] = "docker"
    settings_section = "docker"
    settings_model = DockerSettings
    settings: DockerSettings
    job_model = DockerJobConfig
    template_resource = "docker.json"

    def __init__(self, settings: DockerSettings, context: BackendContext) -> None:
        super().__init__(settings, context)
        self.daemon = Daemon(settings)
        self._healthy_until = 0.0

    @property
    def kill_grace_seconds(self) -> float:
        return float(self.settings.kill_grace_seconds)

    async def check(self) -> None:
        if time.monotonic() < self._healthy_until:
            return
        engine = await self.daemon.client()
        try:
            await engine.ping()
        except DOCKER_ERRORS as exc:
            raise flowhand_error(exc, "ping", daemon_url=self.daemon.url,
                                 kind=BackendUnavailable) from None
        self._healthy_until = time.monotonic() + PING_CACHE_SECONDS

    # -- starting ---------------------------------------------------------------------------

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        cfg = job.config
        assert isinstance(cfg, DockerJobConfig)
        # The exit watcher starts with the connection, before the first container exists, and
        # its subscription replays the last few seconds: a container that dies at once is seen.
        engine = await self.daemon.client()
        settings = container_settings(
            job, cfg, api_url_rewrite=self.settings.api_url_rewrite,
            host_gateway=self.daemon.host_gateway, cwd=os.getcwd(), log=log,
        )
        await ensure_image(self.daemon, cfg)

        # Once the container exists it must be recorded and started, or removed: a shutdown
        # arriving in between must not leave it half made.
        with anyio.CancelScope(shield=True):
            container_id, name = await self._create(engine, settings)
            infrastructure_pid = self.daemon.pid(container_id)
            log.info("docker.container_created", flow_run_id=str(job.flow_run_id),
                     container_id=container_id, name=name, image=cfg.image)
            await record_pid(infrastructure_pid)
            try:
                for network in cfg.networks[1:]:
                    # Docker attaches one network at create time; the others join before start.
                    await engine.connect_network(network, container_id)
                await engine.start(container_id)
            except DOCKER_ERRORS as exc:
                await self._remove_quietly(container_id)
                raise flowhand_error(exc, "start the container", daemon_url=self.daemon.url,
                                     image=cfg.image) from None
        log.debug("docker.container_started", flow_run_id=str(job.flow_run_id),
                  container_id=container_id)
        return DockerHandle(
            infrastructure_pid=infrastructure_pid,
            flow_run_id=job.flow_run_id,
            container_id=container_id,
            name=name,
            stream_output=cfg.stream_output,
            mem_limit=cfg.mem_limit,
            memswap_limit=cfg.memswap_limit,
            wait_timeout=cfg.container_wait_timeout,
            remove_on_exit=cfg.auto_remove,
            sink=job.output_sink,
            started_here=True,
            tty=bool(settings.get("tty")),
        )

    async def _create(self, engine: Engine, settings: dict[str, Any]) -> tuple[str, str]:
        """Create the container; on a name conflict try `name-1`, `name-2`, ... as Prefect does."""
        base_name = settings.get("name")
        for index in range(1000):
            if base_name and index:
                settings = {**settings, "name": f"{base_name}-{index}"}
            request = create_request(settings, engine.api_version, self.daemon.proxy_env)
            try:
                created = await engine.create_container(request.body, request.name,
                                                        request.platform)
            except DOCKER_ERRORS as exc:
                # 409 from create means the name is taken (the Engine API's only conflict there).
                if base_name and isinstance(exc, APIError) and exc.status_code == 409:
                    continue
                raise flowhand_error(exc, "create the container", daemon_url=self.daemon.url,
                                     image=settings.get("image")) from None
            container_id = str(created["Id"])
            return container_id, str(settings.get("name") or container_id[:12])
        raise LaunchFailed(f"container names {base_name!r}-1 ... -999 are all taken")

    async def _remove_quietly(self, container_id: str) -> None:
        engine = await self.daemon.client()
        try:
            await engine.remove(container_id)
        except DOCKER_ERRORS as exc:  # best effort; the launch error matters more
            log.debug("docker.remove_failed", container_id=container_id, error=explain(exc))

    # -- waiting ----------------------------------------------------------------------------

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, DockerHandle)
        pump = OutputPump(
            ContainerLogs(self.daemon, handle.container_id, handle.tty),
            stream_output=handle.stream_output,
            sink=handle.sink,
            tail_lines=self.settings.crash_log_lines,
            min_seconds=STREAM_MIN_SECONDS,
            max_seconds=STREAM_MAX_SECONDS,
            on_dropped=lambda size, why: self.output_dropped(handle.flow_run_id, size, why),
        )
        ended: Ended | None = None
        async with pump.following():
            with anyio.move_on_after(handle.wait_timeout if handle.wait_timeout else float("inf")):
                ended = await wait_ended(self.daemon, handle.container_id, handle.started_here)
        if ended is None:
            log.warning("docker.wait_timeout", flow_run_id=str(handle.flow_run_id),
                        container_id=handle.container_id, seconds=handle.wait_timeout)
            return Exit(
                status_code=None,
                explanation=f"flowhand stopped watching container {handle.name or ''} after "
                f"container_wait_timeout={handle.wait_timeout}s; it was not stopped.",
                detached=True,
            )
        # A tail only explains a crash; when the output was followed it is in memory anyway.
        tail = await pump.finish(tail=ended.exit_code != 0)
        explanation = None
        if ended.oom and ended.exit_code not in (0, None):
            explanation = oom_message(handle.mem_limit, handle.memswap_limit)
        elif ended.never_started:
            explanation = "The container was created but never started."
        if handle.remove_on_exit and not ended.removed:
            ended.removed = await self._remove_exited(handle.container_id)
        log.info("docker.container_exited", flow_run_id=str(handle.flow_run_id),
                 container_id=handle.container_id, status_code=ended.exit_code, oom=ended.oom,
                 removed=ended.removed)
        return Exit(status_code=ended.exit_code, explanation=explanation, output_tail=tail)

    async def _remove_exited(self, container_id: str) -> bool:
        """Remove an exited container (auto_remove); whether it is gone."""
        engine = await self.daemon.client()
        try:
            await engine.remove(container_id)
        except NotFound:
            return True  # already gone (removed by someone else)
        except DOCKER_ERRORS as exc:
            log.warning("docker.remove_failed", container_id=container_id, error=explain(exc))
            return False
        return True

    # -- stopping and finding ---------------------------------------------------------------

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, DockerHandle)
        info = await self._owned_container(handle.infrastructure_pid, handle.flow_run_id)
        if info is None or not info["State"].get("Running"):
            return
        stop_signal = (info.get("Config") or {}).get("StopSignal") or "SIGTERM"
        # `docker stop` would hold a connection for the whole grace period; signal, then wait on
        # the event stream like `wait()` does, then force.
        if not await self._signal(handle.container_id, stop_signal):
            return
        with anyio.move_on_after(grace_seconds):
            await wait_ended(self.daemon, handle.container_id)
            return
        log.info("docker.container_force_kill", container_id=handle.container_id,
                 grace_seconds=grace_seconds)
        await self._signal(handle.container_id, "SIGKILL")

    async def _signal(self, container_id: str, signal: str) -> bool:
        """Send `signal` to the container; False when it is gone or stopped already."""
        engine = await self.daemon.client()
        try:
            await engine.kill(container_id, signal)
        except NotFound:
            return False
        except APIError as exc:
            if exc.status_code == 409:  # it stopped in the meantime
                return False
            raise flowhand_error(exc, f"send {signal} to the container",
                                 daemon_url=self.daemon.url, kind=InfrastructureError) from None
        except DOCKER_ERRORS as exc:
            raise flowhand_error(exc, f"send {signal} to the container",
                                 daemon_url=self.daemon.url, kind=InfrastructureError) from None
        return True

    async def reattach(self, infrastructure_pid: str, flow_run_id: uuid.UUID) -> Handle | None:
        info = await self._owned_container(infrastructure_pid, flow_run_id)
        if info is None:
            return None
        host_config = info.get("HostConfig") or {}
        memory = int(host_config.get("Memory") or 0)
        swap = int(host_config.get("MemorySwap") or 0)
        return DockerHandle(
            infrastructure_pid=infrastructure_pid,
            flow_run_id=flow_run_id,
            container_id=info["Id"],
            name=str(info.get("Name", "")).lstrip("/") or None,
            mem_limit=format_bytes(memory) if memory else None,
            memswap_limit=format_bytes(swap) if swap > 0 else None,
            remove_on_exit=((info.get("Config") or {}).get("Labels") or {}).get(
                AUTO_REMOVE_LABEL) == "true",
            tty=bool((info.get("Config") or {}).get("Tty")),
        )

    async def _owned_container(
        self, infrastructure_pid: str, flow_run_id: uuid.UUID
    ) -> dict[str, Any] | None:
        """The container behind a pid, if it is on our engine and labelled with this run."""
        base_url, _, container_id = infrastructure_pid.rpartition(":")
        await self.daemon.client()
        if not self.daemon.is_this_daemon(base_url) \
                or not re.fullmatch(r"[0-9a-f]{12,64}", container_id):
            log.info("docker.not_ours", infrastructure_pid=infrastructure_pid,
                     reason="another Docker engine" if not self.daemon.is_this_daemon(base_url)
                     else "not a container id")
            return None
        try:
            info = await inspect(self.daemon, container_id)
        except DOCKER_ERRORS as exc:
            raise flowhand_error(exc, "inspect the container", daemon_url=self.daemon.url,
                                 kind=InfrastructureError) from None
        if info is None:
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(FLOW_RUN_LABEL) != str(flow_run_id):
            log.warning("docker.not_ours", infrastructure_pid=infrastructure_pid,
                        reason=f"label {FLOW_RUN_LABEL} is {labels.get(FLOW_RUN_LABEL)!r}",
                        flow_run_id=str(flow_run_id))
            return None
        return info

    async def aclose(self) -> None:
        await self.daemon.aclose()
