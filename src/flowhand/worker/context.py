"""What the worker's parts share: settings, the API client, the backend, the run table.

Built once by `Worker`; each role (poller, claimer, supervisor, watchdog, reconciler,
shutdown) holds it and reaches the others' state only through it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient
from flowhand.api.models import Deployment, WorkPool
from flowhand.backends.base import Backend
from flowhand.config import Config
from flowhand.events import WorkerEvents
from flowhand.jobs import JobBuilder
from flowhand.journal import Journal
from flowhand.metrics import Metrics
from flowhand.runlogs import RunLogs
from flowhand.worker.health import Health
from flowhand.worker.reporter import Reporter
from flowhand.worker.runs import RunTable
from flowhand.worker.space import SpaceGuard
from flowhand.worker.states import StateWriter


@dataclass
class WorkerContext:
    config: Config
    client: PrefectClient
    backend: Backend
    log: FilteringBoundLogger
    journal: Journal
    metrics: Metrics
    run_logs: RunLogs
    states: StateWriter
    reporter: Reporter
    runs: RunTable
    health: Health
    #: Set when the worker stops claiming runs.
    stop: anyio.Event
    #: A burst of runs from one deployment reads it once per poll, not once per run.
    deployments: ReadCache[uuid.UUID, Deployment]
    #: Turns a claimed run into a job for the backend.
    jobs: JobBuilder
    #: Prefect's worker events (started, submitted, executed, stopped), sent in batches.
    events: WorkerEvents
    #: Whether state_dir has room for another claim.
    space: SpaceGuard
    #: The pool as read (or created) at start-up.
    pool: WorkPool | None = field(default=None)

    @property
    def pool_name(self) -> str:
        assert self.config.pool is not None
        return self.config.pool

    def require_pool(self) -> WorkPool:
        assert self.pool is not None, "the pool is read before any run is handled"
        return self.pool
