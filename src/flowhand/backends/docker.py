"""Run flow runs as Docker containers, a drop-in for Prefect's Docker work pools.

docker-py is blocking, so every call to the daemon runs in a worker thread, but through one
bounded `CapacityLimiter`: the number of threads does not grow with the number of containers.
Exits are not waited for with `container.wait()` (a thread per run for its whole life); a single
thread follows the daemon's event stream for `die`/`oom` events of Prefect-labelled containers and
wakes the waiting task, which then reads the exit code with `inspect`.

Only this module imports docker, and only the docker backend imports this module.
"""

from __future__ import annotations

import calendar
import functools
import os
import re
import shlex
import socket
import sys
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import docker
import docker.errors
import docker.models.containers
import docker.types
import docker.utils
import requests.exceptions
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.backends.base import (
    Backend,
    Exit,
    Handle,
    Job,
    JobConfig,
    OutputSink,
    RecordPid,
    StopIntent,
)
from flowhand.config import Config
from flowhand.errors import BackendUnavailable, LaunchFailed

log = structlog.get_logger("flowhand.backends.docker")

T = TypeVar("T")

#: Prefect's default image: its release for the worker's Python version.
DEFAULT_IMAGE = (
    f"prefecthq/prefect:{PREFECT_COMPAT_VERSION}-python"
    f"{sys.version_info.major}.{sys.version_info.minor}"
)
#: The label every Prefect-started container carries; flowhand finds its containers by it.
FLOW_RUN_LABEL = "io.prefect.flow-run-id"
#: Marks containers whose job asked for auto_remove, so a re-attached watcher removes them too.
AUTO_REMOVE_LABEL = "io.flowhand.auto-remove"
#: A successful ping is trusted this long, so `check()` before every poll costs nothing.
PING_CACHE_SECONDS = 2.0
#: Even with the event stream healthy, each waiting task re-inspects its container this often:
#: a cheap guard against an event stream that silently stopped delivering.
RECHECK_SECONDS = 60.0
#: On (re)subscribing, ask the daemon to replay this much history: dockerd flushes the response
#: headers before it registers the listener, and a container may die in between.
EVENT_REPLAY_SECONDS = 5
#: How many recent die/oom events are remembered for containers nobody waits on yet (a container
#: that exits, and with auto_remove vanishes, before `wait()` registers).
SEEN_EVENTS_KEPT = 4096
#: Streamed output is fetched again after this many seconds, doubling up to the maximum while the
#: container is quiet.
STREAM_MIN_SECONDS = 0.5
STREAM_MAX_SECONDS = 10.0
#: Docker engine API version that understands `host-gateway` in extra_hosts (Engine 20.10).
HOST_GATEWAY_API_VERSION = (1, 41)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
HOST_DOCKER_INTERNAL = "host.docker.internal"
VOLUME_OPTIONS = {
    "ro", "rw", "z", "Z", "shared", "slave", "private", "rshared", "rslave", "rprivate",
    "nocopy", "consistent", "cached", "delegated",
}

ImagePullPolicy = Literal["IfNotPresent", "Always", "IfPossible", "Never"]


class RegistryCredentials(BaseModel):
    """The data of Prefect's DockerRegistryCredentials block."""

    model_config = ConfigDict(extra="ignore")

    username: str
    password: SecretStr
    registry_url: str
    reauth: bool = True


class DockerJobConfig(JobConfig):
    """The job variables of a Prefect Docker pool."""

    image: str = DEFAULT_IMAGE
    registry_credentials: RegistryCredentials | None = None
    #: None: Prefect's rule, an untagged or `latest` image is pulled Always, any other IfNotPresent.
    image_pull_policy: ImagePullPolicy | None = None
    networks: list[str] = []
    network_mode: str | None = None
    auto_remove: bool = False
    volumes: list[str] = []
    mem_limit: str | None = None
    memswap_limit: str | None = None
    privileged: bool = False
    container_create_kwargs: dict[str, Any] | None = None
    #: Stop watching (not stopping) a container that has not exited after this many seconds.
    container_wait_timeout: int | None = Field(None, gt=0)


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
    #: The last lines streamed, the crash tail when auto_remove took the container with its logs.
    recent: deque[str] = field(default_factory=deque)
    #: Docker's timestamp (ns) of the last line copied to our stdout.
    streamed_ns: int = 0
    #: Started by this process, after the event stream was up: its `die` cannot be missed.
    started_here: bool = False


# -- pure helpers (no daemon) ------------------------------------------------------------------


def container_name(name: str | None) -> str | None:
    """A Docker-valid container name from the flow run name, as Prefect slugifies it.

    Prefect uses python-slugify with Docker's character set; this is the same rule without
    slugify's transliteration table (non-ASCII letters lose their accents or are dropped).
    """
    if not name:
        return None
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"[^a-zA-Z0-9_.-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).strip("-")
    text = text[:250].strip("-")
    # Docker names must start with a letter or digit.
    return text.lstrip("_-.") or None


def docker_labels(labels: dict[str, str]) -> dict[str, str]:
    """Prefect's labels in Docker's reverse-DNS form (`prefect.io/x` → `io.prefect.x`)."""
    out: dict[str, str] = {}
    for name, value in labels.items():
        if "/" in name:
            namespace, key = name.split("/", 1)
            name = ".".join(reversed(namespace.split("."))) + "." + key
        out[name] = value
    out["io.prefect.version"] = PREFECT_COMPAT_VERSION
    return out


def pull_policy(image: str, policy: ImagePullPolicy | None) -> ImagePullPolicy:
    """The effective policy: Kubernetes' (and Prefect's) defaulting when none is set."""
    if policy is not None:
        return policy
    _, tag = docker.utils.parse_repository_tag(image)
    if "@" in image:
        return "IfNotPresent"
    return "Always" if tag in (None, "latest") else "IfNotPresent"


def parse_volume(volume: str, cwd: str) -> tuple[str | None, str, str | None]:
    """(source, target, options) of a `volumes` entry; ValueError says what is wrong.

    A relative bind source (`.`, `./x`, `../x`) is resolved against the worker's directory, as
    prefect-docker 0.7.4 does; a source without a slash is a named volume.
    """
    spec = volume.strip()
    if not spec:
        raise ValueError("a volume cannot be empty")
    parts = spec.split(":")
    if len(parts) == 1:
        if not spec.startswith("/"):
            raise ValueError(
                f"{volume!r}: an anonymous volume is an absolute container path, e.g. '/data'"
            )
        return None, spec, None
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"{volume!r}: expected 'SOURCE:/container/path[:ro|rw]'")
    source, target = parts[0], parts[1]
    options = parts[2] if len(parts) == 3 else None
    if not target.startswith("/"):
        raise ValueError(f"{volume!r}: the container path {target!r} must be absolute")
    if source in (".", "..") or source.startswith(("./", "../")):
        source = os.path.normpath(os.path.join(cwd, source))
    elif not source.startswith("/") and ("/" in source or "\\" in source):
        raise ValueError(
            f"{volume!r}: {source!r} is neither an absolute path, a './relative' path nor a "
            "volume name"
        )
    if options is not None:
        unknown = set(options.split(",")) - VOLUME_OPTIONS
        if unknown:
            raise ValueError(
                f"{volume!r}: unknown volume option(s) {', '.join(sorted(unknown))} "
                "(use ro or rw)"
            )
    return source, target, options


@dataclass
class NetworkPlan:
    network_mode: str | None
    env: dict[str, str]
    extra_hosts: dict[str, str]


def _replace_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit(parts._replace(netloc=netloc))


def plan_network(
    config: DockerJobConfig,
    env: dict[str, str],
    rewrite: str,
    platform: str = sys.platform,
    host_gateway: bool = True,
) -> NetworkPlan:
    """How the container reaches the API, following prefect-docker's rules.

    `rewrite="auto"`: on Linux, a loopback API with no network chosen means host networking;
    otherwise `localhost`/`127.0.0.1` become `host.docker.internal`, mapped to the host's gateway.
    `"never"` leaves the URL and networking alone; any other value is the hostname to use instead
    of loopback (no host networking is inferred). A PREFECT_API_URL set in the job's own env is
    the user's choice and is never rewritten.
    """
    api_url = env.get("PREFECT_API_URL")
    host = urlsplit(api_url).hostname if api_url else None
    loopback = host in LOOPBACK_HOSTS
    mode = config.network_mode
    if mode is None and not config.networks and rewrite == "auto" and loopback \
            and platform == "linux":
        mode = "host"
    env = dict(env)
    extra_hosts: dict[str, str] = {}
    if mode != "host" and api_url and rewrite != "never":
        if loopback and "PREFECT_API_URL" not in config.env:
            target = HOST_DOCKER_INTERNAL if rewrite == "auto" else rewrite
            env["PREFECT_API_URL"] = api_url = _replace_host(api_url, target)
        # Docker Desktop resolves host.docker.internal by itself; a Linux engine needs the map.
        if urlsplit(api_url).hostname == HOST_DOCKER_INTERNAL and platform == "linux" \
                and host_gateway:
            extra_hosts[HOST_DOCKER_INTERNAL] = "host-gateway"
    return NetworkPlan(network_mode=mode, env=env, extra_hosts=extra_hosts)


def _merge_extra_hosts(ours: dict[str, str], theirs: Any) -> dict[str, str] | list[str]:
    if isinstance(theirs, dict):
        return {**ours, **{str(k): str(v) for k, v in theirs.items()}}
    if isinstance(theirs, list):
        merged = dict(ours)
        for entry in theirs:
            name, sep, address = str(entry).partition(":")
            if sep:
                merged[name] = address
        return merged
    raise LaunchFailed("container_create_kwargs.extra_hosts must be a mapping or a list")


def _format_bytes(count: int) -> str:
    for unit, size in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if count and count % size == 0:
            return f"{count // size}{unit}"
    return f"{count}b"


def _parse_docker_time(text: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 timestamp as Docker writes it, or None."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", text)
    if not match:
        return None
    seconds = calendar.timegm(datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S").timetuple())
    return seconds * 1_000_000_000 + int((match[2] or "0").ljust(9, "0"))


def _explanation(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    return isinstance(exc, docker.errors.DockerException) and \
        "Error while fetching server API version" in str(exc)


def _create_container(client: Any, settings: dict[str, Any]) -> str:
    """`client.containers.create(**settings)` without the inspect docker-py sends after it."""
    kwargs: dict[str, Any] = {"command": None, **settings, "version": client.api._version}
    args = docker.models.containers._create_container_args(kwargs)
    return str(client.api.create_container(**args)["Id"])


# -- the event watcher ---------------------------------------------------------------------------


@dataclass
class _Seen:
    died: bool = False
    exit_code: int | None = None
    oom: bool = False


class _Waiter:
    """One task's interest in one container; woken on its events and on resubscription."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        self.changed = anyio.Event()

    def arm(self) -> None:
        # A fresh event *before* inspecting, so an event that lands during the inspect is kept.
        self.changed = anyio.Event()


class _ExitWatcher:
    """One thread following the daemon's event stream, handing events to the event loop."""

    def __init__(
        self, api: Any, token: anyio.lowlevel.EventLoopToken, probe: Callable[[], None]
    ) -> None:
        self._api = api
        self._token = token
        self._probe = probe
        self._waiters: dict[str, set[_Waiter]] = {}
        self.seen: OrderedDict[str, _Seen] = OrderedDict()
        #: The event stream is up: every `die` from now on reaches `seen`.
        self.subscribed = False
        self._closing = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(
            target=self._follow, name="flowhand-docker-events", daemon=True
        )
        self._thread.start()

    def register(self, container_id: str) -> _Waiter:
        waiter = _Waiter(container_id)
        self._waiters.setdefault(container_id, set()).add(waiter)
        return waiter

    def unregister(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.container_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.container_id]

    def close(self) -> None:
        self._closing.set()
        stream = self._stream
        if stream is not None:
            # Shuts the socket down, which ends the thread's blocking read.
            stream.close()

    # The methods below run in the watcher thread, except the `_on_*` callbacks, which it
    # schedules on the event loop so that waiters and `seen` are only touched there.

    def _post(self, func: Callable[..., None], *args: Any) -> bool:
        try:
            anyio.from_thread.run_sync(func, *args, token=self._token)
        except RuntimeError:  # the event loop is gone: nobody is left to tell
            return False
        return True

    def _follow(self) -> None:
        since = int(time.time()) - EVENT_REPLAY_SECONDS
        delay = 0.0
        while not self._closing.is_set():
            try:
                self._probe()
                stream = self._api.events(
                    since=since,
                    filters={"type": "container", "event": ["die", "oom"],
                             "label": [FLOW_RUN_LABEL]},
                    decode=True,
                )
            except Exception as exc:  # noqa: BLE001 - any failure means: try again later
                delay = min(max(0.5, delay * 2), 30.0)
                self._post(self._on_lost, _explanation(exc), delay)
                self._closing.wait(delay)
                continue
            self._stream = stream
            if self._closing.is_set():
                stream.close()
                return
            if not self._post(self._on_subscribed):
                stream.close()
                return
            subscribed_at = time.monotonic()
            error = "the daemon closed the event stream"
            try:
                for event in stream:
                    since = max(since, int(event.get("time", since)) - 1)
                    if not self._post(self._on_event, event):
                        return
            except Exception as exc:  # noqa: BLE001 - the connection broke; resubscribe
                error = _explanation(exc)
            finally:
                stream.close()
            if self._closing.is_set():
                return
            # A stream that lived a while was healthy: reconnect at once. One that keeps dying
            # young (a proxy cutting it, a daemon restarting) backs off.
            delay = 0.0 if time.monotonic() - subscribed_at > 30 else max(0.5, delay * 2)
            delay = min(delay, 30.0)
            self._post(self._on_lost, error, delay)
            self._closing.wait(delay)
            # Everyone re-inspects after resubscribing; the replay only recovers `oom` flags
            # and exit codes of auto-removed containers, so a bounded window is enough.
            since = max(since, int(time.time()) - 60)

    def _on_subscribed(self) -> None:
        self.subscribed = True
        log.debug("docker.events_subscribed", watching=len(self._waiters))
        # Anything may have happened while we were not subscribed: everyone looks again.
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.changed.set()

    def _on_lost(self, error: str, retry_in: float) -> None:
        self.subscribed = False
        log.warning("docker.events_lost", error=error, retry_in_seconds=retry_in,
                    watching=len(self._waiters))

    def _on_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        if not container_id:
            return
        seen = self.seen.pop(container_id, None) or _Seen()
        self.seen[container_id] = seen
        while len(self.seen) > SEEN_EVENTS_KEPT:
            self.seen.popitem(last=False)
        action = event.get("Action") or event.get("status")
        if action == "oom":
            seen.oom = True
        elif action == "die":
            seen.died = True
            code = (actor.get("Attributes") or {}).get("exitCode")
            seen.exit_code = int(code) if code is not None and str(code).lstrip("-").isdigit() \
                else None
        for waiter in self._waiters.get(container_id, ()):
            waiter.changed.set()


@dataclass
class _Ended:
    """How a container ended, from `inspect` or, when it is gone, from its events."""

    exit_code: int | None
    oom: bool
    removed: bool = False
    never_started: bool = False


# -- the backend ---------------------------------------------------------------------------------


class DockerBackend(Backend):
    """Start each run as a container on one Docker engine."""

    pool_type: ClassVar[str] = "docker"
    job_model = DockerJobConfig
    template_resource = "docker.json"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.settings = config.docker
        self._limiter = anyio.CapacityLimiter(self.settings.api_threads)
        # Pulls can take minutes; they get their own slots so they never starve inspects.
        self._pull_limiter = anyio.CapacityLimiter(2)
        self._client: Any = None
        self._client_lock = anyio.Lock()
        self._watcher: _ExitWatcher | None = None
        self._healthy_until = 0.0
        self._host_gateway = True

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def daemon_url(self) -> str:
        """Where the daemon is, for messages (before a client exists to say it exactly)."""
        return (self.settings.base_url or os.environ.get("DOCKER_HOST")
                or "unix:///var/run/docker.sock")

    async def _call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(
            functools.partial(func, *args, **kwargs), limiter=self._limiter
        )

    def _probe_socket(self) -> None:
        """Fail fast, and cleanly, when a local daemon socket does not answer.

        docker-py leaks its socket when a unix-socket connect fails (an unclosed-socket warning
        on every retry), so a local socket is tried here first, with our own socket.
        """
        url = docker.utils.parse_host(self.settings.base_url or os.environ.get("DOCKER_HOST"))
        if not url.startswith("http+unix://"):
            return
        path = url[len("http+unix://"):]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.settings.timeout_seconds)
            try:
                sock.connect(path)
            except OSError as exc:
                raise BackendUnavailable(self._unreachable_message(
                    f"cannot connect to {path}: {exc.strerror or exc}")) from None

    def _connect(self) -> Any:
        self._probe_socket()
        environment = dict(os.environ)
        if self.settings.base_url:
            # Through from_env so that DOCKER_TLS_VERIFY / DOCKER_CERT_PATH still apply.
            environment["DOCKER_HOST"] = self.settings.base_url
        return docker.from_env(
            environment=environment,
            timeout=int(self.settings.timeout_seconds),
            # The limiter's threads, the pull slots and the event stream each hold a connection.
            max_pool_size=self.settings.api_threads + 3,
        )

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                try:
                    client = await self._call(self._connect)
                except docker.errors.DockerException as exc:
                    raise BackendUnavailable(self._unreachable_message(exc)) from None
                version = tuple(int(p) for p in str(client.api.api_version).split(".")[:2])
                self._host_gateway = version >= HOST_GATEWAY_API_VERSION
                if not self._host_gateway:
                    log.warning("docker.no_host_gateway", api_version=client.api.api_version,
                                hint="host.docker.internal needs Docker Engine 20.10+")
                self._client = client
                log.debug("docker.connected", base_url=client.api.base_url,
                          api_version=client.api.api_version)
        return self._client

    async def _get_watcher(self) -> _ExitWatcher:
        client = await self._get_client()
        if self._watcher is None:
            self._watcher = _ExitWatcher(
                client.api, anyio.lowlevel.current_token(), self._probe_socket
            )
        return self._watcher

    def _unreachable_message(self, exc: BaseException | str) -> str:
        reason = exc if isinstance(exc, str) else _explanation(exc)
        return (
            f"cannot reach the Docker daemon at {self.daemon_url}: {reason}. Is Docker "
            "running, and may this user use its socket? Set docker.base_url (or DOCKER_HOST)."
        )

    def _pid(self, container_id: str) -> str:
        return f"{self._client.api.base_url}:{container_id}"

    # -- Backend interface ------------------------------------------------------------------

    @property
    def kill_grace_seconds(self) -> float:
        return float(self.settings.kill_grace_seconds)

    async def check(self) -> None:
        if time.monotonic() < self._healthy_until:
            return
        client = await self._get_client()
        try:
            await self._call(self._probe_socket)
            await self._call(client.ping)
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, the daemon does not answer
            raise BackendUnavailable(self._unreachable_message(exc)) from None
        self._healthy_until = time.monotonic() + PING_CACHE_SECONDS

    async def start(self, job: Job, record_pid: RecordPid) -> Handle:
        cfg = job.config
        assert isinstance(cfg, DockerJobConfig)
        client = await self._get_client()
        # The watcher starts before the first container exists, and its subscription replays
        # the last few seconds, so a container that dies at once is still seen.
        await self._get_watcher()
        settings = self._container_settings(job, cfg)
        await self._ensure_image(client, cfg)

        # Once the container exists it must be recorded and started, or removed: a shutdown
        # arriving in between must not leave it half made.
        with anyio.CancelScope(shield=True):
            container_id, name = await self._create(client, settings)
            infrastructure_pid = self._pid(container_id)
            log.info("docker.container_created", flow_run_id=str(job.flow_run_id),
                     container_id=container_id, name=name, image=cfg.image)
            await record_pid(infrastructure_pid)
            try:
                for network in cfg.networks[1:]:
                    await self._call(self._connect_network, client, network, container_id)
                await self._call(client.api.start, container_id)
            except Exception as exc:  # noqa: BLE001 - every failure here ends the same way
                await self._remove_quietly(container_id)
                raise self._launch_error(exc, cfg, "start the container") from None
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
            recent=deque(maxlen=self.settings.crash_log_lines),
            started_here=True,
        )

    async def wait(self, handle: Handle) -> Exit:
        assert isinstance(handle, DockerHandle)
        ended: _Ended | None = None
        async with anyio.create_task_group() as tg:
            if handle.stream_output or handle.sink is not None:
                tg.start_soon(self._stream, handle)
            with anyio.move_on_after(handle.wait_timeout if handle.wait_timeout else float("inf")):
                ended = await self._wait_ended(handle.container_id, handle.started_here)
            tg.cancel_scope.cancel()
        if ended is None:
            log.warning("docker.wait_timeout", flow_run_id=str(handle.flow_run_id),
                        container_id=handle.container_id, seconds=handle.wait_timeout)
            return Exit(
                status_code=None,
                explanation=f"flowhand stopped watching container {handle.name or ''} after "
                f"container_wait_timeout={handle.wait_timeout}s; it was not stopped.",
                detached=True,
            )
        tail = await self._output_tail(handle, ended)
        explanation = None
        if ended.oom and ended.exit_code not in (0, None):
            explanation = self._oom_message(handle)
        elif ended.never_started:
            explanation = "The container was created but never started."
        if handle.remove_on_exit and not ended.removed:
            client = await self._get_client()
            try:
                await self._call(client.api.remove_container, handle.container_id, force=True)
                ended.removed = True
            except docker.errors.NotFound:
                ended.removed = True  # already gone (removed by someone else)
            except docker.errors.APIError as exc:
                log.warning("docker.remove_failed", container_id=handle.container_id,
                            error=_explanation(exc))
        log.info("docker.container_exited", flow_run_id=str(handle.flow_run_id),
                 container_id=handle.container_id, status_code=ended.exit_code, oom=ended.oom,
                 removed=ended.removed)
        return Exit(status_code=ended.exit_code, explanation=explanation, output_tail=tail)

    async def kill(
        self, handle: Handle, grace_seconds: float, intent: StopIntent | None = None
    ) -> None:
        assert isinstance(handle, DockerHandle)
        info = await self._owned_container(handle.infrastructure_pid, handle.flow_run_id)
        if info is None or not info["State"].get("Running"):
            return
        client = await self._get_client()
        stop_signal = (info.get("Config") or {}).get("StopSignal") or "SIGTERM"
        # `docker stop` would hold a thread for the whole grace period; signal, then wait on
        # the event stream like `wait()` does, then force.
        try:
            await self._call(client.api.kill, handle.container_id, signal=stop_signal)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: it stopped in the meantime
                raise
        with anyio.move_on_after(grace_seconds):
            await self._wait_ended(handle.container_id)
            return
        log.info("docker.container_force_kill", container_id=handle.container_id,
                 grace_seconds=grace_seconds)
        try:
            await self._call(client.api.kill, handle.container_id, signal="SIGKILL")
        except docker.errors.APIError as exc:
            if not isinstance(exc, docker.errors.NotFound) and exc.status_code != 409:
                raise

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
            mem_limit=_format_bytes(memory) if memory else None,
            memswap_limit=_format_bytes(swap) if swap > 0 else None,
            remove_on_exit=((info.get("Config") or {}).get("Labels") or {}).get(
                AUTO_REMOVE_LABEL) == "true",
            recent=deque(maxlen=self.settings.crash_log_lines),
        )

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- starting ---------------------------------------------------------------------------

    def _container_settings(self, job: Job, cfg: DockerJobConfig) -> dict[str, Any]:
        """docker-py `containers.create` arguments; LaunchFailed says what to fix."""
        try:
            command = shlex.split(job.command)
        except ValueError as exc:
            raise LaunchFailed(f"cannot parse command {job.command!r}: {exc}") from None
        if cfg.networks and cfg.network_mode:
            raise LaunchFailed(
                f"set either networks ({cfg.networks}) or network_mode ({cfg.network_mode!r}) in "
                "the job variables, not both"
            )
        plan = plan_network(cfg, job.env, self.settings.api_url_rewrite,
                            host_gateway=self._host_gateway)
        binds: list[str] = []
        mounts: list[Any] = []
        cwd = os.getcwd()
        for volume in cfg.volumes:
            try:
                source, target, options = parse_volume(volume, cwd)
            except ValueError as exc:
                raise LaunchFailed(f"invalid volume: {exc}") from None
            if source is None:
                mounts.append(docker.types.Mount(target=target, source=None, type="volume"))
            else:
                binds.append(f"{source}:{target}" + (f":{options}" if options else ""))

        extra = dict(cfg.container_create_kwargs or {})
        clashing = sorted(k for k in extra if k in DockerJobConfig.model_fields)
        if clashing:
            # As Prefect does: job variables win over container_create_kwargs.
            log.warning("docker.create_kwargs_ignored", keys=clashing,
                        hint="set these as job variables instead")
            for key in clashing:
                del extra[key]
        for key, variable in (("environment", "env"), ("network", "networks"),
                              ("detach", None), ("remove", "auto_remove")):
            if key in extra:
                instead = f"; use the job variable {variable!r}" if variable else ""
                raise LaunchFailed(f"container_create_kwargs may not set {key!r}{instead}")
        extra_hosts: dict[str, str] | list[str] = plan.extra_hosts
        if "extra_hosts" in extra:
            extra_hosts = _merge_extra_hosts(plan.extra_hosts, extra.pop("extra_hosts"))
        if "mounts" in extra:
            mounts = list(extra.pop("mounts")) + mounts

        settings: dict[str, Any] = {
            **extra,
            "image": cfg.image,
            "command": command,
            "environment": plan.env,
            "labels": {**docker_labels(job.labels),
                       **({AUTO_REMOVE_LABEL: "true"} if cfg.auto_remove else {})},
            "name": container_name(cfg.name),
            "auto_remove": False,
            "privileged": cfg.privileged,
        }
        optional = {
            "network": cfg.networks[0] if cfg.networks else None,
            "network_mode": plan.network_mode,
            "volumes": binds,
            "mounts": mounts,
            "extra_hosts": extra_hosts,
            "mem_limit": cfg.mem_limit,
            "memswap_limit": cfg.memswap_limit,
        }
        settings.update({k: v for k, v in optional.items() if v})
        return settings

    async def _ensure_image(self, client: Any, cfg: DockerJobConfig) -> None:
        policy = pull_policy(cfg.image, cfg.image_pull_policy)
        if policy == "Never":
            return
        if policy == "IfNotPresent":
            try:
                await self._call(client.api.inspect_image, cfg.image)
                return
            except docker.errors.ImageNotFound:
                pass
            except Exception as exc:  # noqa: BLE001
                raise self._launch_error(exc, cfg, "look up the image") from None
        try:
            await anyio.to_thread.run_sync(self._pull, client, cfg, limiter=self._pull_limiter)
        except LaunchFailed as exc:
            if policy != "IfPossible":
                raise
            try:
                await self._call(client.api.inspect_image, cfg.image)
            except docker.errors.ImageNotFound:
                raise LaunchFailed(
                    f"{exc} (image_pull_policy is IfPossible, but no local copy exists either)"
                ) from None
            log.warning("docker.pull_failed_using_local", image=cfg.image, error=str(exc))

    def _pull(self, client: Any, cfg: DockerJobConfig) -> None:
        """Log in if credentials are given (only now that a pull is needed), then pull."""
        creds = cfg.registry_credentials
        if creds is not None:
            log.info("docker.registry_login", registry=creds.registry_url,
                     username=creds.username)
            try:
                client.login(username=creds.username, password=creds.password.get_secret_value(),
                             registry=creds.registry_url, reauth=creds.reauth)
            except Exception as exc:  # noqa: BLE001
                if _is_unreachable(exc):
                    raise LaunchFailed(self._unreachable_message(exc)) from None
                raise LaunchFailed(
                    f"cannot log in to registry {creds.registry_url!r} as {creds.username!r}: "
                    f"{_explanation(exc)}; check the registry_credentials block"
                ) from None
        repository, tag = docker.utils.parse_repository_tag(cfg.image)
        log.info("docker.image_pulling", image=cfg.image)
        try:
            # The streaming API, because the high-level pull hides errors reported mid-stream.
            for line in client.api.pull(repository, tag=tag or "latest", stream=True,
                                        decode=True):
                if isinstance(line, dict) and line.get("error"):
                    raise LaunchFailed(f"cannot pull image {cfg.image!r}: {line['error']}")
        except LaunchFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            if _is_unreachable(exc):
                raise LaunchFailed(self._unreachable_message(exc)) from None
            raise LaunchFailed(
                f"cannot pull image {cfg.image!r}: {_explanation(exc)}; check the image name, "
                "the registry and registry_credentials"
            ) from None

    async def _create(self, client: Any, settings: dict[str, Any]) -> tuple[str, str]:
        """Create the container; on a name conflict try `name-1`, `name-2`, ... as Prefect does."""
        base_name = settings.get("name")
        for index in range(1000):
            if base_name and index:
                settings = {**settings, "name": f"{base_name}-{index}"}
            try:
                container_id = await self._call(_create_container, client, settings)
            except docker.errors.APIError as exc:
                if base_name and exc.status_code == 409 and "name" in _explanation(exc):
                    continue
                raise self._launch_error(exc, settings, "create the container") from None
            except Exception as exc:  # noqa: BLE001
                raise self._launch_error(exc, settings, "create the container") from None
            return container_id, str(settings.get("name") or container_id[:12])
        raise LaunchFailed(f"container names {base_name!r}-1 ... -999 are all taken")

    def _launch_error(
        self, exc: BaseException, cfg: DockerJobConfig | dict[str, Any], doing: str
    ) -> LaunchFailed:
        image = cfg.image if isinstance(cfg, DockerJobConfig) else cfg.get("image")
        if _is_unreachable(exc):
            return LaunchFailed(self._unreachable_message(exc))
        text = _explanation(exc)
        if isinstance(exc, docker.errors.ImageNotFound) or (
            isinstance(exc, docker.errors.NotFound) and "image" in text.lower()
        ):
            return LaunchFailed(
                f"image {image!r} is not present on the Docker host ({text}). Pull or build it "
                "there, or set image_pull_policy to IfNotPresent or Always so flowhand pulls it."
            )
        if isinstance(exc, docker.errors.NotFound) and "network" in text.lower():
            return LaunchFailed(f"cannot {doing}: {text}. Create the network (docker network "
                                "create NAME) or fix networks / network_mode in the job variables.")
        if isinstance(exc, TypeError | docker.errors.InvalidArgument):
            return LaunchFailed(f"cannot {doing}: invalid container_create_kwargs or job "
                                f"variables: {text}")
        return LaunchFailed(f"cannot {doing}: {text}")

    @staticmethod
    def _connect_network(client: Any, network: str, container_id: str) -> None:
        # Docker attaches one network at create time; the others join before the start.
        client.networks.get(network).connect(container_id)

    async def _remove_quietly(self, container_id: str) -> None:
        try:
            await self._call(self._client.api.remove_container, container_id, force=True)
        except Exception as exc:  # noqa: BLE001 - best effort; the launch error matters more
            log.debug("docker.remove_failed", container_id=container_id, error=_explanation(exc))

    # -- watching ---------------------------------------------------------------------------

    async def _inspect(self, container_id: str) -> dict[str, Any] | None:
        client = await self._get_client()
        try:
            info: dict[str, Any] = await self._call(client.api.inspect_container, container_id)
        except docker.errors.NotFound:
            return None
        return info

    async def _wait_ended(self, container_id: str, started_here: bool = False) -> _Ended:
        """How the container ended: from its `die` event, or from `inspect`.

        Inspects are the fallback, not the rule (each is a call to the daemon): a container
        this process started while the event stream was up is not inspected until an event,
        a resubscription or RECHECK_SECONDS says to; one found by `reattach` is inspected at
        once, since it may have died while nobody listened.
        """
        watcher = await self._get_watcher()
        waiter = watcher.register(container_id)
        failures = 0
        look = not (started_here and watcher.subscribed)
        try:
            while True:
                waiter.arm()
                seen = watcher.seen.get(container_id)
                # A kill (137) is inspected all the same: OOMKilled there is the reliable word.
                if seen is not None and seen.died and seen.exit_code not in (None, 137):
                    return _Ended(exit_code=seen.exit_code, oom=seen.oom)
                if not look:
                    look = True
                    with anyio.move_on_after(RECHECK_SECONDS):
                        await waiter.changed.wait()
                    continue
                try:
                    info = await self._inspect(container_id)
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - the daemon may come back: keep watching
                    failures += 1
                    log.warning("docker.inspect_failed", container_id=container_id,
                                error=_explanation(exc), failures=failures)
                    await anyio.sleep(min(2.0 ** failures, RECHECK_SECONDS))
                    continue
                seen = watcher.seen.get(container_id) or _Seen()
                if info is None:
                    return _Ended(exit_code=seen.exit_code, oom=seen.oom, removed=True)
                state = info.get("State") or {}
                if state.get("Status") == "created":
                    # `wait()` follows started containers only, so this is one found by
                    # `reattach` after flowhand died between create and start: it never ran.
                    return _Ended(exit_code=None, oom=False, never_started=True)
                if not state.get("Running"):
                    code = state.get("ExitCode")
                    return _Ended(
                        exit_code=int(code) if code is not None else seen.exit_code,
                        oom=bool(state.get("OOMKilled")) or seen.oom,
                        removed=state.get("Status") == "removing",
                    )
                with anyio.move_on_after(RECHECK_SECONDS):
                    await waiter.changed.wait()
        finally:
            watcher.unregister(waiter)

    def _oom_message(self, handle: DockerHandle) -> str:
        if handle.mem_limit:
            limit = f"mem_limit={handle.mem_limit}"
            if handle.memswap_limit:
                limit += f", memswap_limit={handle.memswap_limit}"
            return (f"The container ran out of memory and was killed by the kernel ({limit}). "
                    "Raise mem_limit in the job variables or make the flow use less memory.")
        return ("The container ran out of memory and was killed by the kernel (no mem_limit set: "
                "the Docker host itself ran out of memory).")

    # -- output -----------------------------------------------------------------------------

    async def _stream(self, handle: DockerHandle) -> None:
        """Copy new container output to our stdout.

        Polled with `logs(since=...)`, not followed: a follow stream is a thread per container.
        Each poll is one short call; the interval grows to STREAM_MAX_SECONDS while the
        container is quiet, so thousands of quiet containers cost little.
        """
        delay = STREAM_MIN_SECONDS
        while True:
            # Sleep first: a container that ends within it is read once, by `_output_tail`.
            await anyio.sleep(delay)
            wrote = await self._forward_logs(handle)
            delay = STREAM_MIN_SECONDS if wrote else min(delay * 2, STREAM_MAX_SECONDS)

    async def _forward_logs(self, handle: DockerHandle) -> int:
        client = await self._get_client()
        # `since` is inclusive and a float loses nanoseconds: go back a little and drop what
        # was already printed by its exact timestamp.
        since = handle.streamed_ns / 1e9 - 1e-6 if handle.streamed_ns else None
        try:
            data: bytes = await self._call(
                client.api.logs, handle.container_id, stdout=True, stderr=True,
                timestamps=True, since=since,
            )
        except Exception as exc:  # noqa: BLE001 - gone (auto_remove) or unreachable: no output
            log.debug("docker.logs_failed", container_id=handle.container_id,
                      error=_explanation(exc))
            return 0
        lines = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            stamp, _, text = line.partition(" ")
            ns = _parse_docker_time(stamp)
            if ns is None:
                text = line
            elif ns <= handle.streamed_ns:
                continue
            else:
                handle.streamed_ns = ns
            lines.append(text)
            if text.strip():
                handle.recent.append(text)
        if lines and handle.stream_output:
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()
        if lines and handle.sink is not None:
            handle.sink(lines)
        return len(lines)

    async def _output_tail(self, handle: DockerHandle, ended: _Ended) -> list[str]:
        count = self.settings.crash_log_lines
        if handle.stream_output or handle.sink is not None:
            # The last poll picks up what the container printed since the previous one.
            await self._forward_logs(handle)
            return list(handle.recent) if count > 0 else []
        if count <= 0 or ended.exit_code == 0:
            return []  # a tail only explains a crash
        client = await self._get_client()
        try:
            data: bytes = await self._call(
                client.api.logs, handle.container_id, stdout=True, stderr=True, tail=count * 4
            )
        except Exception as exc:  # noqa: BLE001 - auto_remove may have won the race
            log.debug("docker.logs_failed", container_id=handle.container_id,
                      error=_explanation(exc), removed=ended.removed)
            return []
        lines = data.decode("utf-8", errors="replace").splitlines()
        return [line for line in lines if line.strip()][-count:]

    # -- identity ---------------------------------------------------------------------------

    async def _owned_container(
        self, infrastructure_pid: str, flow_run_id: uuid.UUID
    ) -> dict[str, Any] | None:
        """The container behind a pid, if it is on our engine and labelled with this run."""
        base_url, _, container_id = infrastructure_pid.rpartition(":")
        client = await self._get_client()
        if base_url != client.api.base_url or not re.fullmatch(r"[0-9a-f]{12,64}", container_id):
            log.info("docker.not_ours", infrastructure_pid=infrastructure_pid,
                     reason="another Docker engine" if base_url != client.api.base_url
                     else "not a container id")
            return None
        try:
            info = await self._inspect(container_id)
        except Exception as exc:  # noqa: BLE001
            if _is_unreachable(exc):
                raise BackendUnavailable(self._unreachable_message(exc)) from None
            raise
        if info is None:
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(FLOW_RUN_LABEL) != str(flow_run_id):
            log.warning("docker.not_ours", infrastructure_pid=infrastructure_pid,
                        reason=f"label {FLOW_RUN_LABEL} is {labels.get(FLOW_RUN_LABEL)!r}",
                        flow_run_id=str(flow_run_id))
            return None
        return info

