"""The connection to one Docker daemon, shared by everything the Docker backend does.

Every call is asynchronous (`client.Engine`, HTTP/1.1 on the daemon's socket): no thread per call,
and the number of calls in flight is bounded (`docker.api_threads`) however many containers run.
"""

from __future__ import annotations

import os

import anyio
import docker.utils.config
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.auth import RegistryAuth
from flowhand.backends.docker.client import Engine, endpoint
from flowhand.backends.docker.errors import DOCKER_ERRORS, flowhand_error
from flowhand.backends.docker.events import ExitWatcher
from flowhand.backends.docker.settings import DockerSettings
from flowhand.errors import BackendUnavailable

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

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
    """A lazily connected Engine API client, the exit watcher, and registry credentials."""

    def __init__(self, settings: DockerSettings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._engine_lock = anyio.Lock()
        self._watcher: ExitWatcher | None = None
        #: The engine maps `host-gateway` in extra_hosts (known once connected).
        self.host_gateway = True
        #: The Docker client's proxy settings for containers (known once connected).
        self.proxy_env: dict[str, str] = {}
        self.registry_auth = RegistryAuth()

    @property
    def url(self) -> str:
        """Where the daemon is, for messages (before a client exists to say it exactly)."""
        return (self.settings.base_url or os.environ.get("DOCKER_HOST")
                or "unix:///var/run/docker.sock")

    async def _connect(self) -> Engine:
        where = endpoint(self.settings.base_url, os.environ)
        engine = Engine(where, timeout=self.settings.timeout_seconds,
                        max_calls=self.settings.api_threads, max_pulls=PULL_SLOTS)
        try:
            version = await engine.connect()
        except BaseException:
            await engine.aclose()
            raise
        # One small file, read once per connection.
        self.proxy_env = proxy_environment(where.url)
        major_minor = tuple(int(p) for p in version.split(".")[:2])
        self.host_gateway = major_minor >= HOST_GATEWAY_API_VERSION
        if not self.host_gateway:
            log.warning("docker.no_host_gateway", api_version=version,
                        hint="host.docker.internal needs Docker Engine 20.10+")
        log.debug("docker.connected", base_url=where.pid_prefix, api_version=version)
        return engine

    async def client(self) -> Engine:
        """The Engine API client, connected on first use; BackendUnavailable when it cannot be."""
        if self._engine is not None:
            return self._engine
        async with self._engine_lock:
            if self._engine is None:
                try:
                    engine = await self._connect()
                except DOCKER_ERRORS as exc:
                    raise flowhand_error(exc, "connect", daemon_url=self.url,
                                         kind=BackendUnavailable) from None
                # Started with the connection: it owns the pool's end (see `events`).
                self._watcher = ExitWatcher(engine)
                self._engine = engine
        return self._engine

    async def watcher(self) -> ExitWatcher:
        """The exit watcher (following events since the connection was made)."""
        await self.client()
        assert self._watcher is not None
        return self._watcher

    def pid(self, container_id: str) -> str:
        """The infrastructure pid of a container on this daemon (Prefect's format)."""
        assert self._engine is not None
        return f"{self._engine.pid_prefix}:{container_id}"

    def is_this_daemon(self, base_url: str) -> bool:
        return self._engine is not None and base_url == self._engine.pid_prefix

    async def aclose(self) -> None:
        watcher, self._watcher = self._watcher, None
        engine, self._engine = self._engine, None
        with anyio.CancelScope(shield=True):
            if watcher is not None:
                await watcher.aclose()
            if engine is not None:
                await engine.aclose()
