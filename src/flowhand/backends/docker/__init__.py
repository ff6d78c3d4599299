"""Run flow runs as Docker containers, a drop-in for Prefect's Docker work pools.

The daemon is spoken to asynchronously (h11 over its socket); docker-py is used as a library
only, for what it is the reference of: `container_create_kwargs` conversion, the Docker client's
configuration and registry credentials. Only the docker backend (or a `[docker]` table in the
configuration) imports this package. Its modules:

- `backend`: `DockerBackend` itself: start, wait, kill, reattach.
- `settings`: the `[docker]` table and the pool's job variables.
- `spec`: a run's container decided without the daemon (name, labels, network, volumes).
- `create_body`: the Engine API's create request from docker-py `containers.create` arguments.
- `client`: the Engine API client (calls, streams, where the daemon is, TLS).
- `http1`: the lean HTTP/1.1 connection pool under it (h11 over anyio streams).
- `streams`: the API's wire formats and errors, decoded without the daemon.
- `daemon`: the connected client, reachability, the Docker client's proxy settings.
- `events` and `exits`: the one task following `die`/`oom` events; how a container ended.
- `images` and `auth`: pull policy, registry login, credentials, pulls.
- `logs`: a container's logs as the output pump's source.
- `errors`: the client's errors in flowhand's terms.
"""

from __future__ import annotations

from flowhand.backends.docker.backend import DockerBackend, DockerHandle
from flowhand.backends.docker.settings import (
    DEFAULT_IMAGE,
    DockerJobConfig,
    DockerSettings,
    RegistryCredentials,
)
from flowhand.backends.docker.spec import (
    container_name,
    docker_labels,
    parse_volume,
    plan_network,
    pull_policy,
)

__all__ = [
    "DEFAULT_IMAGE",
    "DockerBackend",
    "DockerHandle",
    "DockerJobConfig",
    "DockerSettings",
    "RegistryCredentials",
    "container_name",
    "docker_labels",
    "parse_volume",
    "plan_network",
    "pull_policy",
]
