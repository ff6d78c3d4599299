"""Start-up: read (or create, or repair) the work pool and check the configured queues exist."""

from __future__ import annotations

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.models import WorkPool
from flowhand.backends.base import Backend
from flowhand.config import Config
from flowhand.errors import APIError, AuthError, ConfigError, Conflict, NotFound
from flowhand.pool_template import template_for_pool
from flowhand.service_loop import Backoff, retry_until
from flowhand.worker.health import Health
from flowhand.worker.runs import pool_of


class PoolSetup:
    def __init__(self, *, config: Config, client: PrefectClient, backend: Backend,
                 health: Health, log: FilteringBoundLogger, stop: anyio.Event) -> None:
        self.config = config
        self.pool_name = pool_of(config)
        self.client = client
        self.backend = backend
        self.health = health
        self.log = log
        self.stop = stop
        #: The pool as read (or created) at start-up.
        self.pool: WorkPool | None = None

    def require_pool(self) -> WorkPool:
        assert self.pool is not None, "the pool is read before any run is handled"
        return self.pool

    async def until_ready(self, run_once: bool) -> bool:
        """`setup()`, waiting out an unreachable API as a service; False if stopped first."""

        def report(exc: Exception, delay: float, failures: int) -> None:
            self.health.unhealthy_reason = f"cannot read work pool {self.pool_name!r}: {exc}"
            self.log.error("worker.startup_failed", error=str(exc), api_url=self.client.api_url,
                          retry_in_seconds=round(delay, 1))

        # As a service an unreachable API is waited out; --run-once fails at once.
        retry_on: tuple[type[Exception], ...] = () if run_once else (APIError,)
        pool = await retry_until(self.setup, retry_on=retry_on, give_up_on=(AuthError,),
                                 backoff=Backoff(1.0, 60.0), on_failure=report, stop=self.stop)
        if pool is None:
            return False
        self.health.unhealthy_reason = None
        return True

    async def setup(self) -> WorkPool:
        """Read (or create, or repair) the pool and check the configured queues exist."""
        pool = await self._sync_pool()
        missing = []
        for queue in self.config.work_queues:
            try:
                await self.client.read_work_queue(self.pool_name, queue)
            except NotFound:
                missing.append(queue)
        if missing:
            raise ConfigError(
                f"work queue(s) {', '.join(repr(q) for q in missing)} not found in pool "
                f"{self.pool_name!r}; create them (prefect work-queue create NAME --pool "
                f"{self.pool_name}) or fix work_queues"
            )
        self.pool = pool
        return pool

    async def _sync_pool(self) -> WorkPool:
        backend, name = self.backend, self.pool_name
        template = template_for_pool(self.config, backend)
        try:
            pool = await self.client.read_work_pool(name)
        except NotFound:
            if not self.config.create_pool:
                raise ConfigError(
                    f"work pool {name!r} not found and create_pool is false; create it "
                    f"(prefect work-pool create {name} --type {backend.pool_type})"
                ) from None
            try:
                pool = await self.client.create_work_pool(name, backend.pool_type, template)
                self.log.info("pool.created", type=backend.pool_type)
            except Conflict:
                pool = await self.client.read_work_pool(name)
        if pool.type != backend.pool_type:
            raise ConfigError(
                f"work pool {name!r} has type {pool.type!r} but this worker runs the "
                f"{backend.pool_type!r} backend; set type = {pool.type!r} (--type) or use "
                "another pool"
            )
        if not pool.base_job_template:
            await self.client.update_work_pool_template(name, template)
            pool.base_job_template = template
            self.log.info("pool.template_filled")
        return pool
