"""Getting a run's image onto the Docker host: the pull policy, registry login and pulling."""

from __future__ import annotations

import anyio.to_thread
import docker.errors
import docker.utils
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.auth import registry_of
from flowhand.backends.docker.client import Engine
from flowhand.backends.docker.daemon import Daemon
from flowhand.backends.docker.errors import DOCKER_ERRORS, flowhand_error
from flowhand.backends.docker.settings import DockerJobConfig, RegistryCredentials
from flowhand.backends.docker.spec import pull_policy
from flowhand.backends.docker.streams import ImageNotFound
from flowhand.errors import LaunchFailed

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

#: What a pull can fail with: the daemon, or docker-py reading the image name or credentials.
_PULL_ERRORS = (*DOCKER_ERRORS, docker.errors.DockerException)


async def ensure_image(daemon: Daemon, cfg: DockerJobConfig) -> None:
    """Pull the image if its policy says so; LaunchFailed says why it cannot be had."""
    engine = await daemon.client()
    policy = pull_policy(cfg.image, cfg.image_pull_policy)
    if policy == "Never":
        return
    if policy == "IfNotPresent":
        try:
            await engine.inspect_image(cfg.image)
            return
        except ImageNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise flowhand_error(exc, "look up the image", daemon_url=daemon.url,
                                 image=cfg.image) from None
    try:
        await pull(daemon, engine, cfg)
    except LaunchFailed as exc:
        if policy != "IfPossible":
            raise
        try:
            await engine.inspect_image(cfg.image)
        except ImageNotFound:
            raise LaunchFailed(
                f"{exc} (image_pull_policy is IfPossible, but no local copy exists either)"
            ) from None
        log.warning("docker.pull_failed_using_local", image=cfg.image, error=str(exc))


async def _login(daemon: Daemon, engine: Engine, creds: RegistryCredentials) -> None:
    """Log in to the block's registry, unless already logged in as that user and not `reauth`."""
    log.info("docker.registry_login", registry=creds.registry_url, username=creds.username)
    credentials = {"username": creds.username, "password": creds.password.get_secret_value(),
                   "email": None, "serveraddress": creds.registry_url}
    try:
        if not creds.reauth and creds.username == await anyio.to_thread.run_sync(
                daemon.registry_auth.username, creds.registry_url):
            return
        await engine.login(credentials)
    except _PULL_ERRORS as exc:
        raise flowhand_error(
            exc, f"log in to registry {creds.registry_url!r} as {creds.username!r}",
            daemon_url=daemon.url, hint="check the registry_credentials block",
        ) from None
    daemon.registry_auth.remember(creds.registry_url, credentials)


async def pull(daemon: Daemon, engine: Engine, cfg: DockerJobConfig) -> None:
    """Log in if credentials are given (only now that a pull is needed), then pull."""
    if cfg.registry_credentials is not None:
        await _login(daemon, engine, cfg.registry_credentials)
    log.info("docker.image_pulling", image=cfg.image)
    try:
        repository, tag = docker.utils.parse_repository_tag(cfg.image)
        header = await anyio.to_thread.run_sync(daemon.registry_auth.header,
                                                registry_of(repository))
        async with engine.pull(repository, tag or "latest", header) as progress:
            # Errors can come mid-stream, after the daemon answered 200.
            async for line in progress:
                if line.get("error"):
                    raise LaunchFailed(f"cannot pull image {cfg.image!r}: {line['error']}")
    except _PULL_ERRORS as exc:
        raise flowhand_error(
            exc, f"pull image {cfg.image!r}", daemon_url=daemon.url,
            hint="check the image name, the registry and registry_credentials",
        ) from None
