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

from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import FlowRun, StateType
from flowhand.api.pagination import collect
from flowhand.clock import utcnow
from flowhand.errors import BackendUnavailable, NotFound
from flowhand.journal import Entry
from flowhand.worker.context import WorkerContext
from flowhand.worker.history import restore_if_reopened
from flowhand.worker.outcomes import never_started, vanished
from flowhand.worker.runs import Run, RunPhase
from flowhand.worker.supervisor import RunSupervisor

#: States in which a run still needs its worker.
ACTIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


class Reconciler:
    def __init__(self, ctx: WorkerContext, supervisor: RunSupervisor) -> None:
        self.ctx = ctx
        self.supervisor = supervisor
        self.last_run_at = 0.0

    def due(self) -> bool:
        elapsed = time.monotonic() - self.last_run_at
        return elapsed >= self.ctx.config.reconcile_interval_seconds

    async def reconcile(self, startup: bool) -> int:
        """Take charge of runs this worker owns but is not handling; return how many."""
        ctx = self.ctx
        self.last_run_at = time.monotonic()
        entries = {e.flow_run_id: e for e in ctx.journal.entries()}
        candidates: dict[uuid.UUID, FlowRun] = {}
        if startup:
            for flow_run in await self._owned_active_runs():
                candidates[flow_run.id] = flow_run
        for run_id, entry in entries.items():
            uid = uuid.UUID(run_id)
            if uid in candidates or uid in ctx.runs:
                continue
            try:
                flow_run = await ctx.client.read_flow_run(uid)
            except NotFound:
                ctx.journal.forget(run_id)
                continue
            if self._owned(flow_run, entry):
                candidates[uid] = flow_run
            else:
                ctx.journal.forget(run_id)
        taken = 0
        for uid, flow_run in candidates.items():
            if uid in ctx.runs:
                continue
            recover = functools.partial(self._recover, entry=entries.get(str(uid)))
            ctx.runs.spawn(recover, ctx.runs.track(flow_run))
            taken += 1
        if taken:
            ctx.log.info("reconcile.found", runs=taken, startup=startup)
        return taken

    async def _owned_active_runs(self) -> list[FlowRun]:
        ctx = self.ctx
        query = FlowRunFilter(states=ACTIVE_STATES, pool=ctx.pool_name)
        found = await collect(ctx.client.read_flow_runs, query.body())
        return [r for r in found if r.labels.get("prefect.worker.name") == ctx.config.name]

    def _our_infrastructure(self, flow_run: FlowRun, entry: Entry | None) -> str | None:
        """The infrastructure this worker started for the run: its journal's, else the run's
        own record when the run carries this worker's label (the journal was lost)."""
        if entry is not None and entry.infrastructure_pid:
            return entry.infrastructure_pid
        if flow_run.labels.get("prefect.worker.name") == self.ctx.config.name:
            return flow_run.infrastructure_pid
        return None

    def _owned(self, flow_run: FlowRun, entry: Entry) -> bool:
        state = flow_run.state
        if state is None or state.type not in ACTIVE_STATES:
            return False
        return (
            flow_run.labels.get("prefect.worker.name") == self.ctx.config.name
            or str(state.state_details.transition_id) == entry.transition_id
            or (entry.infrastructure_pid is not None
                and entry.infrastructure_pid == flow_run.infrastructure_pid)
        )

    async def _recover(self, run: Run, entry: Entry | None) -> None:
        ctx, flow_run, log = self.ctx, run.flow_run, run.log
        if entry is not None and entry.transition_id:
            run.claimed(uuid.UUID(entry.transition_id))
        state = flow_run.state
        if state is not None and state.type is StateType.PENDING:
            if await restore_if_reopened(ctx.states, flow_run.id, log, "recovery"):
                run.enter(RunPhase.DONE)
                return
            labelled_ours = flow_run.labels.get("prefect.worker.name") == ctx.config.name
            if (state.state_details.transition_id != run.transition_id
                    if run.transition_id is not None else not labelled_ours):
                # Another worker's claim (it took the run after ours ended): not ours to end.
                # Without a journal entry (the journal was lost), our label is the proof.
                log.info("flow_run.claimed_by_another", reason="PENDING under another claim")
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
            handle = await ctx.backend.reattach(pid, flow_run.id)
        except BackendUnavailable as exc:
            # Cannot tell whether it lives: leave it to the next reconcile pass.
            log.warning("flow_run.reattach_deferred", infrastructure_pid=pid, error=str(exc))
            return
        if handle is None:
            log.warning("flow_run.vanished", infrastructure_pid=pid)
            await self.supervisor.end(run, vanished(f"It was {pid}."))
            return
        start = flow_run.start_time
        run.max_run_seconds = ctx.config.max_run_seconds
        run.mark_started(handle, (utcnow() - start).total_seconds() if start else 0.0,
                         event="reattached", infrastructure_pid=pid,
                         state=flow_run.state_type and flow_run.state_type.value)
        if run.stop_intent is not None:
            self.supervisor.stop_soon(run)
        await self.supervisor.watch(run)
