"""Run flow runs as Kubernetes Jobs, a drop-in for Prefect's kubernetes work pools.

Only this package imports lightkube (an asynchronous client on httpx, like the rest of
flowhand), and only the kubernetes backend (or a `[kubernetes]` table) imports this package.
Its modules:

- `backend`: `KubernetesBackend` itself: start, wait, kill, reattach.
- `settings`: the `[kubernetes]` table and the pool's job configuration.
- `manifest`: a run's Job manifest finished as Prefect's worker finishes it; pid parsing.
- `cluster`: cluster access as Prefect's worker has it; one client per cluster.
- `watch`: the watch multiplexer: one Job watch and one pod watch per namespace and pool.
- `runwatch`: one run's wait on that feed, its deadlines and its notes in the run's logs.
- `status`: what a Job, its pods and its events say, read into a verdict (pure).
- `logs`: a pod's logs as the output pump's source.
"""

from __future__ import annotations

from flowhand.backends.kubernetes.backend import KubernetesBackend, KubernetesHandle
from flowhand.backends.kubernetes.settings import KubernetesJobConfig, KubernetesSettings

__all__ = ["KubernetesBackend", "KubernetesHandle", "KubernetesJobConfig", "KubernetesSettings"]
