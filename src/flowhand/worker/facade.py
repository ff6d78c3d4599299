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
from flowhand.worker.health import Health
from flowhand.worker.observers import standard_observers
from flowhand.worker.poller import Poller
from flowhand.worker.pool_setup import PoolSetup
from flowhand.worker.reconciler import Reconciler
from flowhand.worker.reporter import Reporter
from flowhand.worker.runs import Run, RunReports, RunTable, pool_of, worker_logger
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
        self.config, self.client, self.backend = config, client, backend
        self.log = worker_logger(config.pool, backend.pool_type, config.name)
        self.metrics = metrics = Metrics(config.pool, backend.pool_type,
                                         backend.context.reports.counts)
        client.transport.on_wait(metrics.api_wait)
        self.run_logs = RunLogs(client, config.name)
        self.states = StateWriter(client, self.run_logs, config.name, backend.pool_type,
                                  self.log)
        #: Set when the worker stops claiming runs.
        self.stopping = anyio.Event()
        self.health = Health(config.poll_interval_seconds, config.watch_interval_seconds,
                             self.stopping)
        self.jobs = JobBuilder(config, client, backend)
        #: Prefect's worker events (started, submitted, executed, stopped), sent in batches.
        self.events = WorkerEvents(client, config.name, backend.pool_type, metrics,
                                   self.jobs.flow)
        #: Journal and run files live under the worker's own name, locked while it runs.
        self.state_dir = WorkerStateDir(config.state_dir, config.name)
        self.journal = Journal(self.state_dir.claims_dir)
        observers = standard_observers(metrics, self.states, backend.pool_type, self.journal,
                                       self.events)
        self.run_table = RunTable(config.limit, metrics, self.log, on_done=self.events.forget,
                                  observers=observers)
        #: Reports about runs, published to the same observers.
        self.reports = RunReports(observers)
        #: Whether state_dir has room for another claim.
        self.space = SpaceGuard(self.state_dir.path, config.state_dir_min_free_bytes,
                                self.health, self.log)
        self._build_roles()
        #: The port the HTTP endpoint listens on, once it does.
        self.http_port: int | None = None

    def _build_roles(self) -> None:
        """Each role gets the parts it uses, and nothing else."""
        config, client, backend, log = self.config, self.client, self.backend, self.log
        runs, states, stop = self.run_table, self.states, self.stopping
        self.pool_setup = PoolSetup(config=config, client=client, backend=backend,
                                    health=self.health, log=log, stop=stop)
        self.supervisor = RunSupervisor(
            config=config, client=client, backend=backend, runs=runs, states=states,
            reporter=Reporter(client, states, self.reports, config.retry_crashed),
            journal=self.journal, metrics=self.metrics,
            # A burst of runs from one deployment reads it once per poll, not once per run.
            deployments=ReadCache(client.read_deployment,
                                  ttl_seconds=config.poll_interval_seconds),
            jobs=self.jobs, events=self.events, pool=self.pool_setup.require_pool)
        backend.context.reports.on_output_dropped(self.supervisor.output_dropped)
        backend.context.reports.on_run_note(states.post_log)
        backend.context.reports.on_infrastructure_event(self.events.infrastructure)
        #: The event stream's wake-ups of the poller and cancellations, when enabled.
        self.wakeups = Wakeups(
            config=config, client=client, runs=runs, metrics=self.metrics, log=log, stop=stop,
            pool=self.pool_setup.require_pool) if config.event_stream.enabled else None
        self.poller = Poller(config=config, client=client, backend=backend, runs=runs,
                             health=self.health, space=self.space, metrics=self.metrics,
                             log=log, stop=stop, handle_run=self.supervisor.handle,
                             wakeups=self.wakeups)
        self.watchdog = Watchdog(client, pool_of(config), runs, self.supervisor.stop_soon,
                                 self.wakeups)
        if self.wakeups is not None:
            self.wakeups.on_cancel(self.watchdog.cancel_requested)
        self.reconciler = Reconciler(config=config, client=client, backend=backend, runs=runs,
                                     states=states, journal=self.journal,
                                     reports=self.reports, log=log,
                                     supervisor=self.supervisor)
        self.shutdown = Shutdown(config.shutdown, runs, log, self.supervisor.stop_soon)
        self.takeover = Takeover(config=config, client=client, runs=runs, states=states,
                                 reports=self.reports, log=log, stop=stop)

    # -- what callers and tests see ----------------------------------------------------------

    @property
    def pool(self) -> WorkPool | None:
        return self.pool_setup.pool

    @property
    def runs(self) -> dict[uuid.UUID, Run]:
        return dict(self.run_table.runs)

    @property
    def unhealthy_reason(self) -> str | None:
        return self.health.unhealthy_reason

    @property
    def in_flight(self) -> int:
        return len(self.run_table)

    def stop(self) -> None:
        """Stop claiming new runs at once; what happens to runs in flight is `[shutdown]`'s."""
        if not self.stopping.is_set():
            self.log.info("worker.stopping", in_flight=len(self.run_table),
                          mode=self.config.shutdown.mode)
        self.stopping.set()
        self.run_table.stop()

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
            await self.backend.prepare()
            await self._serve(run_once)
        finally:
            self.state_dir.release()

    async def _serve(self, run_once: bool) -> None:
        async with anyio.create_task_group() as tg:
            self.run_table.attach(tg)
            # Probes get answers (503 "starting") while the pool cannot be read yet.
            if self.config.http.enabled:
                self.http_port = await tg.start(
                    serve_http, self.config.http.host, self.config.http.port,
                    self.health.liveness, self.health.readiness, self.metrics)
                tg.start_soon(self._tick_while_starting)
            if not await self.pool_setup.until_ready(run_once):
                tg.cancel_scope.cancel()
                return
            self.log.info("worker.started", run_once=run_once, limit=self.config.limit,
                          work_queues=self.config.work_queues)
            tg.start_soon(self.run_logs.run)
            tg.start_soon(self.events.run)
            self.events.started(self.pool)
            await self.reconciler.reconcile(startup=True)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._watch_loop)
            if not run_once:
                tg.start_soon(self.takeover.run)
                if self.wakeups is not None:
                    tg.start_soon(self.wakeups.run)
            if run_once:
                await self.poller.poll_once_retrying()
                self.stop()
                await self.run_table.drained.wait()
            else:
                await self.poller.run()
                await self.shutdown.run()
            detached = len(self.run_table)
            self.events.stopped()
            tg.cancel_scope.cancel()
        self.log.info("worker.stopped", detached=detached)

    async def _tick_while_starting(self) -> None:
        # The watch loop proves liveness once running; until then this does.
        while self.pool_setup.pool is None:
            self.health.tick()
            await anyio.sleep(1)

    async def _heartbeat_loop(self) -> None:
        async def beat() -> None:
            try:
                await self.client.send_heartbeat(pool_of(self.config), self.config.name,
                                                 self.config.heartbeat_interval_seconds)
            except APIError as exc:
                self.log.warning("worker.heartbeat_failed", error=str(exc))
            await self.poller.report_too_late()

        await service_loop(beat, interval=self.config.heartbeat_interval_seconds)

    async def _watch_loop(self) -> None:
        """Cancellation requests, maximum run times and reconciliation, every few seconds."""
        async def tick() -> None:
            self.health.tick()
            try:
                await self.watchdog.check_cancellations()
            except APIError as exc:
                self.log.debug("watch.failed", error=str(exc))
            self.watchdog.check_run_times()
            if self.reconciler.due() and not self.stopping.is_set():
                try:
                    await self.reconciler.reconcile(startup=False)
                except APIError as exc:
                    self.log.debug("reconcile.failed", error=str(exc))

        await service_loop(tick, interval=self.config.watch_interval_seconds, sleep_first=True)
