"""Recovery: take charge of runs this worker owns but is not handling.

At start-up these are the runs in the journal and the runs on the server labelled with this
worker's name; later, only journal entries (a run whose handler failed). A run claimed but
never started is handed back; a started one is re-attached and watched, or reported when its
infrastructure is gone.
"""

from __future__ import annotations

import functools
import time
import uuid

from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import FlowRun, StateType
from flowhand.api.pagination import collect
from flowhand.backends.base import Backend
from flowhand.clock import utcnow
from flowhand.config import Config
from flowhand.errors import BackendUnavailable, NotFound
from flowhand.journal import Entry, Journal
from flowhand.worker.history import restore_if_reopened
from flowhand.worker.outcomes import never_started, vanished
from flowhand.worker.runs import Run, RunPhase, RunReport, RunReports, RunTable, pool_of
from flowhand.worker.states import StateWriter
from flowhand.worker.supervisor import RunSupervisor

#: States in which a run still needs its worker.
ACTIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


class Reconciler:
    def __init__(self, *, config: Config, client: PrefectClient, backend: Backend,
                 runs: RunTable, states: StateWriter, journal: Journal, reports: RunReports,
                 log: FilteringBoundLogger, supervisor: RunSupervisor) -> None:
        self.config = config
        self.pool_name = pool_of(config)
        self.client = client
        self.backend = backend
        self.runs = runs
        self.states = states
        #: Read here; entries are let go through the observers (`reports`).
        self.journal = journal
        self.reports = reports
        self.log = log
        self.supervisor = supervisor
        self.last_run_at = 0.0

    def due(self) -> bool:
        elapsed = time.monotonic() - self.last_run_at
        return elapsed >= self.config.reconcile_interval_seconds

    async def reconcile(self, startup: bool) -> int:
        """Take charge of runs this worker owns but is not handling; return how many."""
        self.last_run_at = time.monotonic()
        entries = {e.flow_run_id: e for e in self.journal.entries()}
        candidates: dict[uuid.UUID, FlowRun] = {}
        if startup:
            for flow_run in await self._owned_active_runs():
                candidates[flow_run.id] = flow_run
        for run_id, entry in entries.items():
            uid = uuid.UUID(run_id)
            if uid in candidates or uid in self.runs:
                continue
            try:
                flow_run = await self.client.read_flow_run(uid)
            except NotFound:
                self.reports.publish(RunReport(uid, forget=True))
                continue
            if self._owned(flow_run, entry):
                candidates[uid] = flow_run
            else:
                self.reports.publish(RunReport(uid, forget=True))
        taken = 0
        for uid, flow_run in candidates.items():
            if uid in self.runs:
                continue
            recover = functools.partial(self._recover, entry=entries.get(str(uid)))
            self.runs.spawn(recover, self.runs.track(flow_run))
            taken += 1
        if taken:
            self.log.info("reconcile.found", runs=taken, startup=startup)
        return taken

    async def _owned_active_runs(self) -> list[FlowRun]:
        query = FlowRunFilter(states=ACTIVE_STATES, pool=self.pool_name)
        found = await collect(self.client.read_flow_runs, query.body())
        return [r for r in found if r.worker_name == self.config.name]

    def _our_infrastructure(self, flow_run: FlowRun, entry: Entry | None) -> str | None:
        """The infrastructure this worker started for the run: its journal's, else the run's
        own record when the run carries this worker's label (the journal was lost)."""
        if entry is not None and entry.infrastructure_pid:
            return entry.infrastructure_pid
        if flow_run.worker_name == self.config.name:
            return flow_run.infrastructure_pid
        return None

    async def _pending_is_ours(self, run: Run) -> bool:
        """False when a PENDING run is not ours to recover: re-opened after it finished (its
        final state is put back), or claimed by another worker since ours ended."""
        state = run.flow_run.state
        if state is None or state.type is not StateType.PENDING:
            return True
        if await restore_if_reopened(self.states, run.id, "recovery"):
            return False
        if run.transition_id is not None:
            ours = state.state_details.transition_id == run.transition_id
        else:
            # Without a journal entry (the journal was lost), our label is the proof.
            ours = run.flow_run.worker_name == self.config.name
        if not ours:
            run.log.info("flow_run.claimed_by_another", reason="PENDING under another claim")
        return ours

    def _owned(self, flow_run: FlowRun, entry: Entry) -> bool:
        state = flow_run.state
        if state is None or state.type not in ACTIVE_STATES:
            return False
        return (
            flow_run.worker_name == self.config.name
            or str(state.state_details.transition_id) == entry.transition_id
            or (entry.infrastructure_pid is not None
                and entry.infrastructure_pid == flow_run.infrastructure_pid)
        )

    async def _recover(self, run: Run, entry: Entry | None) -> None:
        flow_run, log = run.flow_run, run.log
        if entry is not None and entry.transition_id:
            run.claimed(uuid.UUID(entry.transition_id))
        if not await self._pending_is_ours(run):
            run.enter(RunPhase.DONE)
            return
        pid = run.infrastructure_pid = self._our_infrastructure(flow_run, entry)
        if pid is None:
            if flow_run.state_type is StateType.PENDING:
                await self.supervisor.end(run, never_started())
            else:
                await self.supervisor.end(
                    run, vanished("No infrastructure id was recorded for it."))
            return
        try:
            handle = await self.backend.reattach(pid, flow_run.id)
        except BackendUnavailable as exc:
            # Cannot tell whether it lives: leave it to the next reconcile pass.
            log.warning("flow_run.reattach_deferred", infrastructure_pid=pid, error=str(exc))
            return
        if handle is None:
            log.warning("flow_run.vanished", infrastructure_pid=pid)
            await self.supervisor.end(run, vanished(f"It was {pid}."))
            return
        start = flow_run.start_time
        run.max_run_seconds = self.config.max_run_seconds
        run.mark_started(handle, (utcnow() - start).total_seconds() if start else 0.0,
                         event="reattached", infrastructure_pid=pid,
                         state=flow_run.state_type and flow_run.state_type.value)
        if run.stop_intent is not None:
            self.supervisor.stop_soon(run)
        await self.supervisor.watch(run)
