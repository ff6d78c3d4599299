"""Run flow runs as Docker containers, a drop-in for Prefect's Docker work pools.

Only this package imports docker-py, and only the docker backend (or a `[docker]` table in the
configuration) imports this package. Its modules:

- `backend`: `DockerBackend` itself: start, wait, kill, reattach.
- `settings`: the `[docker]` table and the pool's job variables.
- `spec`: a run's container decided without the daemon (name, labels, network, volumes).
- `create_body`: the Engine API's create request from docker-py `containers.create` arguments.
- `daemon`: the client, the bounded threads that call it, reachability.
- `events` and `exits`: the one thread following `die`/`oom` events; how a container ended.
- `images`: pull policy, registry login, pulls.
- `logs`: a container's logs as the output pump's source.
- `errors`: docker-py's errors in flowhand's terms.
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
