"""The worker: one process serving one work pool with one backend.

`Worker` only wires the parts together and runs their loops; each part owns one role:

    PoolSetup      read, create or repair the pool at start-up
    Poller         poll for due runs, as many as there are free slots
    RunSupervisor  claim (Claimer), build, start when due, watch, end one run
    Watchdog       cancellations and maximum run times of runs in flight
    Wakeups        the server's event stream: polls when runs fall due, cancellations at once
    Reconciler     runs this worker owns but is not handling (journal, labels)
    Shutdown       drain, detach or reschedule what is in flight at the end
    Takeover       hand back the lapsed claims of workers that are gone
    StateWriter    every write about a run to the server; Reporter decides final states

`Worker.run()` is the service; `Worker.run(run_once=True)` polls once and waits for what it
claimed, which is how tests drive the loop without sleeps. The promise: every run flowhand
claims reaches a true final state or is handed back to the pool, whatever happens to the
worker, the API or the infrastructure.
"""

from __future__ import annotations

import uuid

import anyio
import anyio.abc

from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient
from flowhand.api.models import WorkPool
from flowhand.backends.base import Backend
from flowhand.config import Config
from flowhand.errors import APIError, ConfigError
from flowhand.events import WorkerEvents
from flowhand.http import serve_http
from flowhand.jobs import JobBuilder
from flowhand.journal import Journal
from flowhand.metrics import Metrics
from flowhand.runlogs import RunLogs
from flowhand.service_loop import service_loop
from flowhand.state_dir import WorkerStateDir
from flowhand.worker.context import WorkerContext
from flowhand.worker.health import Health
from flowhand.worker.poller import Poller
from flowhand.worker.pool_setup import PoolSetup
from flowhand.worker.reconciler import Reconciler
from flowhand.worker.reporter import Reporter
from flowhand.worker.runs import Run, RunTable, worker_logger
from flowhand.worker.shutdown import Shutdown
from flowhand.worker.space import SpaceGuard
from flowhand.worker.states import StateWriter
from flowhand.worker.supervisor import RunSupervisor
from flowhand.worker.takeover import Takeover
from flowhand.worker.wakeups import Wakeups
from flowhand.worker.watchdog import Watchdog


class Worker:
    """One worker process serving one work pool with one backend."""

    def __init__(self, config: Config, client: PrefectClient, backend: Backend) -> None:
        if not config.pool:
            raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config file")
        log = worker_logger(config.pool, backend.pool_type, config.name)
        metrics = Metrics(config.pool, backend.pool_type)
        run_logs = RunLogs(client, config.name)
        states = StateWriter(client, run_logs, config.name, backend.pool_type)
        stop = anyio.Event()
        health = Health(config.poll_interval_seconds, config.watch_interval_seconds, stop)
        jobs = JobBuilder(config, client, backend)
        events = WorkerEvents(client, config.name, backend.pool_type, metrics, jobs.flow)
        #: Journal and run files live under the worker's own name, locked while it runs.
        self.state_dir = WorkerStateDir(config.state_dir, config.name)
        self.ctx = ctx = WorkerContext(
            config=config, client=client, backend=backend, log=log,
            journal=Journal(self.state_dir.claims_dir), metrics=metrics, run_logs=run_logs,
            states=states, reporter=Reporter(client, states, metrics, config.retry_crashed),
            runs=RunTable(config.limit, metrics, log, on_done=events.forget),
            health=health,
            stop=stop,
            deployments=ReadCache(client.read_deployment,
                                  ttl_seconds=config.poll_interval_seconds),
            jobs=jobs,
            events=events,
            space=SpaceGuard(self.state_dir.path, config.state_dir_min_free_bytes, health, log),
        )
        self.pool_setup = PoolSetup(ctx)
        self.supervisor = RunSupervisor(ctx)
        backend.on_output_dropped = self.supervisor.output_dropped
        #: The event stream's wake-ups of the poller and cancellations, when enabled.
        self.wakeups = Wakeups(ctx) if config.event_stream.enabled else None
        self.poller = Poller(ctx, self.supervisor.handle, self.wakeups)
        self.watchdog = Watchdog(ctx, self.supervisor.stop_soon, self.wakeups)
        if self.wakeups is not None:
            self.wakeups.on_cancel = self.watchdog.cancel_requested
        self.reconciler = Reconciler(ctx, self.supervisor)
        self.shutdown = Shutdown(ctx, self.supervisor.stop_soon)
        self.takeover = Takeover(ctx)
        #: The port the HTTP endpoint listens on, once it does.
        self.http_port: int | None = None

    # -- what callers and tests see ----------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def backend(self) -> Backend:
        return self.ctx.backend

    @property
    def metrics(self) -> Metrics:
        return self.ctx.metrics

    @property
    def health(self) -> Health:
        return self.ctx.health

    @property
    def pool(self) -> WorkPool | None:
        return self.ctx.pool

    @property
    def runs(self) -> dict[uuid.UUID, Run]:
        return dict(self.ctx.runs.runs)

    @property
    def unhealthy_reason(self) -> str | None:
        return self.ctx.health.unhealthy_reason

    @property
    def in_flight(self) -> int:
        return len(self.ctx.runs)

    def stop(self) -> None:
        """Stop claiming new runs at once; what happens to runs in flight is `[shutdown]`'s."""
        ctx = self.ctx
        if not ctx.stop.is_set():
            ctx.log.info("worker.stopping", in_flight=len(ctx.runs),
                         mode=ctx.config.shutdown.mode)
        ctx.stop.set()
        ctx.runs.stop()

    async def setup(self) -> WorkPool:
        return await self.pool_setup.setup()

    async def poll_once(self) -> int:
        return await self.poller.poll_once()

    async def reconcile(self, startup: bool) -> int:
        return await self.reconciler.reconcile(startup)

    # -- the service -------------------------------------------------------------------------

    async def run(self, run_once: bool = False) -> None:
        """Serve until `stop()`; with `run_once`, poll once and wait for what was claimed."""
        self.state_dir.acquire()
        try:
            await self.ctx.backend.prepare()
            await self._serve(run_once)
        finally:
            self.state_dir.release()

    async def _serve(self, run_once: bool) -> None:
        ctx = self.ctx
        async with anyio.create_task_group() as tg:
            ctx.runs.attach(tg)
            # Probes get answers (503 "starting") while the pool cannot be read yet.
            if ctx.config.http.enabled:
                self.http_port = await tg.start(
                    serve_http, ctx.config.http.host, ctx.config.http.port,
                    ctx.health.liveness, ctx.health.readiness, ctx.metrics)
                tg.start_soon(self._tick_while_starting)
            if not await self.pool_setup.until_ready(run_once):
                tg.cancel_scope.cancel()
                return
            ctx.log.info("worker.started", run_once=run_once, limit=ctx.config.limit,
                         work_queues=ctx.config.work_queues)
            tg.start_soon(ctx.run_logs.run)
            tg.start_soon(ctx.events.run)
            ctx.events.started(ctx.pool)
            await self.reconciler.reconcile(startup=True)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._watch_loop)
            if not run_once:
                tg.start_soon(self.takeover.run)
                if self.wakeups is not None:
                    tg.start_soon(self.wakeups.run)
            if run_once:
                await self.poller.poll_once()
                self.stop()
                await ctx.runs.drained.wait()
            else:
                await self.poller.run()
                await self.shutdown.run()
            detached = len(ctx.runs)
            ctx.events.stopped()
            tg.cancel_scope.cancel()
        ctx.log.info("worker.stopped", detached=detached)

    async def _tick_while_starting(self) -> None:
        # The watch loop proves liveness once running; until then this does.
        while self.ctx.pool is None:
            self.ctx.health.tick()
            await anyio.sleep(1)

    async def _heartbeat_loop(self) -> None:
        ctx = self.ctx

        async def beat() -> None:
            try:
                await ctx.client.send_heartbeat(ctx.pool_name, ctx.config.name,
                                                ctx.config.heartbeat_interval_seconds)
            except APIError as exc:
                ctx.log.warning("worker.heartbeat_failed", error=str(exc))
            await self.poller.report_too_late()

        await service_loop(beat, interval=ctx.config.heartbeat_interval_seconds)

    async def _watch_loop(self) -> None:
        """Cancellation requests, maximum run times and reconciliation, every few seconds."""
        ctx = self.ctx

        async def tick() -> None:
            ctx.health.tick()
            try:
                await self.watchdog.check_cancellations()
            except APIError as exc:
                ctx.log.debug("watch.failed", error=str(exc))
            self.watchdog.check_run_times()
            if self.reconciler.due() and not ctx.stop.is_set():
                try:
                    await self.reconciler.reconcile(startup=False)
                except APIError as exc:
                    ctx.log.debug("reconcile.failed", error=str(exc))

        await service_loop(tick, interval=ctx.config.watch_interval_seconds, sleep_first=True)
