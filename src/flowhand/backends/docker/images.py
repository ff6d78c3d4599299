"""Getting a run's image onto the Docker host: the pull policy, registry login and pulling."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import docker.errors
import docker.utils
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.daemon import Daemon
from flowhand.backends.docker.errors import DOCKER_ERRORS, flowhand_error
from flowhand.backends.docker.settings import DockerJobConfig
from flowhand.backends.docker.spec import pull_policy
from flowhand.errors import LaunchFailed

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")


async def ensure_image(daemon: Daemon, cfg: DockerJobConfig) -> None:
    """Pull the image if its policy says so; LaunchFailed says why it cannot be had."""
    client = await daemon.client()
    policy = pull_policy(cfg.image, cfg.image_pull_policy)
    if policy == "Never":
        return
    if policy == "IfNotPresent":
        try:
            await daemon.call(client.api.inspect_image, cfg.image)
            return
        except docker.errors.ImageNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise flowhand_error(exc, "look up the image", daemon_url=daemon.url,
                                 image=cfg.image) from None
    try:
        await anyio.to_thread.run_sync(pull, client, cfg, daemon.url,
                                       limiter=daemon.pull_limiter)
    except LaunchFailed as exc:
        if policy != "IfPossible":
            raise
        try:
            await daemon.call(client.api.inspect_image, cfg.image)
        except docker.errors.ImageNotFound:
            raise LaunchFailed(
                f"{exc} (image_pull_policy is IfPossible, but no local copy exists either)"
            ) from None
        log.warning("docker.pull_failed_using_local", image=cfg.image, error=str(exc))


def pull(client: Any, cfg: DockerJobConfig, daemon_url: str) -> None:
    """Log in if credentials are given (only now that a pull is needed), then pull. Blocking."""
    creds = cfg.registry_credentials
    if creds is not None:
        log.info("docker.registry_login", registry=creds.registry_url, username=creds.username)
        try:
            client.login(username=creds.username, password=creds.password.get_secret_value(),
                         registry=creds.registry_url, reauth=creds.reauth)
        except DOCKER_ERRORS as exc:
            raise flowhand_error(
                exc, f"log in to registry {creds.registry_url!r} as {creds.username!r}",
                daemon_url=daemon_url, hint="check the registry_credentials block",
            ) from None
    repository, tag = docker.utils.parse_repository_tag(cfg.image)
    log.info("docker.image_pulling", image=cfg.image)
    try:
        # The streaming API, because the high-level pull hides errors reported mid-stream.
        for line in client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if isinstance(line, dict) and line.get("error"):
                raise LaunchFailed(f"cannot pull image {cfg.image!r}: {line['error']}")
    except DOCKER_ERRORS as exc:
        raise flowhand_error(
            exc, f"pull image {cfg.image!r}", daemon_url=daemon_url,
            hint="check the image name, the registry and registry_credentials",
        ) from None
