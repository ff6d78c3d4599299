"""Registry credentials for pulls, found as docker-py and the docker CLI find them.

docker-py earns its place here: it reads `~/.docker/config.json` (`auths`, and the `credsStore`
and `credHelpers` programs it runs for a registry's credentials) and keeps the logins this
process made. Those reads touch files and may run a helper program, so they are blocking: the
callers run them in a thread, and only when a pull is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import docker.auth


class RegistryAuth:
    """The credentials known for each registry: the Docker client's, and this process's logins."""

    def __init__(self) -> None:
        self._configs: Any = None

    def _loaded(self) -> Any:
        # Read again while empty, as docker-py does: a `docker login` after the worker started
        # still counts.
        if self._configs is None or self._configs.is_empty:
            self._configs = docker.auth.load_config()
        return self._configs

    def header(self, registry: str) -> str | None:
        """The `X-Registry-Auth` header for a pull from `registry`, when credentials are known."""
        found = self._loaded().resolve_authconfig(registry)
        return str(docker.auth.encode_header(found)) if found else None

    def username(self, registry: str) -> str | None:
        """Who we are logged in to `registry` as, if anyone."""
        found = self._loaded().resolve_authconfig(registry)
        return str(found["username"]) if found and found.get("username") else None

    def remember(self, registry: str, credentials: Mapping[str, Any]) -> None:
        """Use `credentials` for pulls from `registry` from now on (a successful login)."""
        self._loaded().add_auth(registry, dict(credentials))


def registry_of(repository: str) -> str:
    """The registry a repository is pulled from (`docker.io` when it names none)."""
    registry, _ = docker.auth.resolve_repository_name(repository)
    return str(registry)
