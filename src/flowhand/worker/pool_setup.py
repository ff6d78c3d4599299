"""Start-up: read (or create, or repair) the work pool and check the configured queues exist."""

from __future__ import annotations

from flowhand.api.models import WorkPool
from flowhand.errors import APIError, AuthError, ConfigError, Conflict, NotFound
from flowhand.pool_template import missing_pool, template_for_pool
from flowhand.service_loop import Backoff, retry_until
from flowhand.worker.context import WorkerContext


class PoolSetup:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def until_ready(self, run_once: bool) -> bool:
        """`setup()`, waiting out an unreachable API as a service; False if stopped first."""
        ctx = self.ctx

        def report(exc: Exception, delay: float, failures: int) -> None:
            ctx.health.unhealthy_reason = f"cannot read work pool {ctx.pool_name!r}: {exc}"
            ctx.log.error("worker.startup_failed", error=str(exc), api_url=ctx.client.api_url,
                          retry_in_seconds=round(delay, 1))

        # As a service an unreachable API is waited out; --run-once fails at once.
        retry_on: tuple[type[Exception], ...] = () if run_once else (APIError,)
        pool = await retry_until(self.setup, retry_on=retry_on, give_up_on=(AuthError,),
                                 backoff=Backoff(1.0, 60.0), on_failure=report, stop=ctx.stop)
        if pool is None:
            return False
        ctx.health.unhealthy_reason = None
        return True

    async def setup(self) -> WorkPool:
        """Read (or create, or repair) the pool and check the configured queues exist."""
        ctx = self.ctx
        pool = await self._sync_pool()
        missing = []
        for queue in ctx.config.work_queues:
            try:
                await ctx.client.read_work_queue(ctx.pool_name, queue)
            except NotFound:
                missing.append(queue)
        if missing:
            raise ConfigError(
                f"work queue(s) {', '.join(repr(q) for q in missing)} not found in pool "
                f"{ctx.pool_name!r}; create them (prefect work-queue create NAME --pool "
                f"{ctx.pool_name}) or fix work_queues"
            )
        ctx.pool = pool
        return pool

    async def _sync_pool(self) -> WorkPool:
        ctx, backend, name = self.ctx, self.ctx.backend, self.ctx.pool_name
        template = template_for_pool(ctx.config, backend)
        try:
            pool = await ctx.client.read_work_pool(name)
        except NotFound:
            if not ctx.config.create_pool:
                raise ConfigError(missing_pool(name, backend.pool_type)) from None
            try:
                pool = await ctx.client.create_work_pool(name, backend.pool_type, template)
                ctx.log.info("pool.created", type=backend.pool_type)
            except Conflict:
                pool = await ctx.client.read_work_pool(name)
        if pool.type != backend.pool_type:
            raise ConfigError(
                f"work pool {name!r} has type {pool.type!r} but this worker runs the "
                f"{backend.pool_type!r} backend; set type = {pool.type!r} (--type) or use "
                "another pool"
            )
        if not pool.base_job_template:
            await ctx.client.update_work_pool_template(name, template)
            pool.base_job_template = template
            ctx.log.info("pool.template_filled")
        return pool
