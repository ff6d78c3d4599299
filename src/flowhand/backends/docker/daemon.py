"""The connection to one Docker daemon, shared by everything the Docker backend does.

docker-py is blocking, so every call to the daemon runs in a worker thread, but through one
bounded `CapacityLimiter`: the number of threads does not grow with the number of containers.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import docker
import docker.errors
import docker.utils
import docker.utils.config
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.errors import flowhand_error, unreachable_message
from flowhand.backends.docker.events import ExitWatcher
from flowhand.backends.docker.settings import DockerSettings
from flowhand.errors import BackendUnavailable

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

T = TypeVar("T")

#: Docker engine API version that understands `host-gateway` in extra_hosts (Engine 20.10).
HOST_GATEWAY_API_VERSION = (1, 41)
#: Pulls can take minutes; they get their own slots so they never starve inspects.
PULL_SLOTS = 2


def proxy_environment(host_url: str) -> dict[str, str]:
    """The proxy variables the Docker client's configuration (`~/.docker/config.json`) sets for
    containers on the daemon at `host_url`, as docker-py and the docker CLI add them."""
    proxies = docker.utils.config.load_general_config().get("proxies", {})
    config = proxies.get(host_url, proxies.get("default", {}))
    names = {"httpProxy": "http_proxy", "httpsProxy": "https_proxy", "ftpProxy": "ftp_proxy",
             "noProxy": "no_proxy"}
    env: dict[str, str] = {}
    for key, name in names.items():
        if config.get(key):
            env[name] = env[name.upper()] = str(config[key])
    return env


class Daemon:
    """A lazily made docker-py client, the thread limits, and the exit watcher."""

    def __init__(self, settings: DockerSettings) -> None:
        self.settings = settings
        self._limiter = anyio.CapacityLimiter(settings.api_threads)
        self.pull_limiter = anyio.CapacityLimiter(PULL_SLOTS)
        self._client: Any = None
        self._client_lock = anyio.Lock()
        self._watcher: ExitWatcher | None = None
        #: The engine maps `host-gateway` in extra_hosts (known once connected).
        self.host_gateway = True
        #: The Docker client's proxy settings for containers (known once connected).
        self.proxy_env: dict[str, str] = {}

    @property
    def url(self) -> str:
        """Where the daemon is, for messages (before a client exists to say it exactly)."""
        return (self.settings.base_url or os.environ.get("DOCKER_HOST")
                or "unix:///var/run/docker.sock")

    def _host_url(self) -> str:
        tls = bool(os.environ.get("DOCKER_TLS_VERIFY") or os.environ.get("DOCKER_CERT_PATH"))
        return str(docker.utils.parse_host(
            self.settings.base_url or os.environ.get("DOCKER_HOST"), tls=tls))

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`func(*args, **kwargs)` in one of the limited threads."""
        return await anyio.to_thread.run_sync(
            functools.partial(func, *args, **kwargs), limiter=self._limiter
        )

    def probe_socket(self) -> None:
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
                raise BackendUnavailable(unreachable_message(
                    self.url, f"cannot connect to {path}: {exc.strerror or exc}")) from None

    def _connect(self) -> Any:
        self.probe_socket()
        environment = dict(os.environ)
        if self.settings.base_url:
            # Through from_env so that DOCKER_TLS_VERIFY / DOCKER_CERT_PATH still apply.
            environment["DOCKER_HOST"] = self.settings.base_url
        client = docker.from_env(
            environment=environment,
            timeout=int(self.settings.timeout_seconds),
            # The limiter's threads, the pull slots and the event stream each hold a connection.
            max_pool_size=self.settings.api_threads + PULL_SLOTS + 1,
        )
        self.proxy_env = proxy_environment(self._host_url())
        return client

    async def client(self) -> Any:
        """The docker-py client, connected on first use; BackendUnavailable when it cannot be."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                try:
                    client = await self.call(self._connect)
                except docker.errors.DockerException as exc:
                    raise flowhand_error(exc, "connect", daemon_url=self.url,
                                         kind=BackendUnavailable) from None
                version = tuple(int(p) for p in str(client.api.api_version).split(".")[:2])
                self.host_gateway = version >= HOST_GATEWAY_API_VERSION
                if not self.host_gateway:
                    log.warning("docker.no_host_gateway", api_version=client.api.api_version,
                                hint="host.docker.internal needs Docker Engine 20.10+")
                self._client = client
                log.debug("docker.connected", base_url=client.api.base_url,
                          api_version=client.api.api_version)
        return self._client

    async def watcher(self) -> ExitWatcher:
        """The exit watcher, started on first use."""
        client = await self.client()
        if self._watcher is None:
            self._watcher = ExitWatcher(
                client.api, anyio.lowlevel.current_token(), self.probe_socket
            )
        return self._watcher

    def pid(self, container_id: str) -> str:
        """The infrastructure pid of a container on this daemon (Prefect's format)."""
        return f"{self._client.api.base_url}:{container_id}"

    def is_this_daemon(self, base_url: str) -> bool:
        return bool(base_url == self._client.api.base_url)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._client is not None:
            self._client.close()
            self._client = None
