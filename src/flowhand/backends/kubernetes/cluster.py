"""Reaching a cluster as Prefect's kubernetes worker does, and one client per cluster.

A job's `cluster_config` (Prefect's KubernetesClusterConfig block: a kubeconfig and a context)
names its cluster; without one, the worker's own: the in-cluster service account, else
`KUBECONFIG` or `~/.kube/config`. Each cluster gets one client (one connection pool) for the
worker's life, however many runs use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import httpx
import structlog
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from structlog.typing import FilteringBoundLogger

from flowhand.errors import BackendUnavailable, InfrastructureError, LaunchFailed

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.kubernetes")

#: The key of the worker's own cluster among the clients.
DEFAULT_CLUSTER = "default"
FIELD_MANAGER = "flowhand"
#: What talking to a cluster can raise.
CLUSTER_ERRORS: tuple[type[Exception], ...] = (ApiError, httpx.HTTPError, OSError)


def cluster_key(cluster_config: dict[str, Any] | None) -> str:
    if not cluster_config:
        return DEFAULT_CLUSTER
    text = json.dumps(cluster_config, sort_keys=True, default=str)
    return "config-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(cluster_config: dict[str, Any] | None, context: str | None) -> KubeConfig:
    """The configuration of a job's cluster; LaunchFailed (or BackendUnavailable for the
    worker's own) with what to fix when there is none."""
    try:
        if cluster_config:
            kubeconfig = cluster_config.get("config", cluster_config)
            config = KubeConfig.from_dict(kubeconfig)
            chosen = cluster_config.get("context_name") or context
        else:
            config = KubeConfig.from_env()
            chosen = context
        if chosen:
            config.get(context_name=chosen)
        return config
    except (ConfigError, OSError, KeyError, TypeError, ValueError) as exc:
        kubeconfig_path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        where = ("the job's cluster_config" if cluster_config else
                 f"the in-cluster service account or {kubeconfig_path}")
        kind = LaunchFailed if cluster_config else BackendUnavailable
        raise kind(f"no usable Kubernetes configuration in {where}: {exc}") from None


class Clusters:
    """One lightkube client per cluster, made on first use."""

    def __init__(self, context: str | None, timeout: float) -> None:
        self.context = context
        self.timeout = timeout
        self._clients: dict[str, AsyncClient] = {}

    def client(self, cluster_config: dict[str, Any] | None = None) -> AsyncClient:
        key = cluster_key(cluster_config)
        client = self._clients.get(key)
        if client is None:
            config = load_config(cluster_config, self.context)
            chosen = (cluster_config or {}).get("context_name") or self.context
            client = AsyncClient(config=config.get(context_name=chosen) if chosen else config,
                                 field_manager=FIELD_MANAGER,
                                 timeout=httpx.Timeout(self.timeout))
            self._clients[key] = client
            log.debug("kubernetes.client", cluster=key)
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


def as_dict(obj: Any) -> dict[str, Any]:
    """A lightkube model as the API's JSON (camelCase keys, timestamps as text)."""
    result: dict[str, Any] = obj.to_dict()
    return result


def api_error_text(exc: Exception) -> str:
    """A Kubernetes API failure in one line."""
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.code} {status.reason or ''}: {status.message or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def unavailable(exc: Exception, what: str) -> InfrastructureError:
    return BackendUnavailable(f"cannot {what}: the Kubernetes API did not answer: "
                              f"{api_error_text(exc)}")
