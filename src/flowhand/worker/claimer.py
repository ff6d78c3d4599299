"""The claim: propose PENDING, act on ACCEPT / REJECT / ABORT / WAIT, and never claim twice.

Each proposal carries a fresh transition id, written to the journal first, so a worker killed
mid-claim still knows the run may be its own. An answer lost in transit is settled by reading
the run back: the claim is ours exactly when the run is PENDING with our transition id.
"""

from __future__ import annotations

import time
import uuid

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.models import OrchestrationResult, OrchestrationStatus, StateType
from flowhand.errors import APIError, NotFound
from flowhand.worker.context import WorkerContext
from flowhand.worker.history import restore_if_reopened
from flowhand.worker.runs import Run

#: How long a claim may be told to WAIT before the run is left for a later poll.
CLAIM_WAIT_LIMIT_SECONDS = 60.0


class Claimer:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def claim(self, run: Run) -> bool:
        """Propose PENDING; True only when this worker now owns the run."""
        ctx, flow_run, log = self.ctx, run.flow_run, run.log
        deadline = time.monotonic() + CLAIM_WAIT_LIMIT_SECONDS
        while True:
            transition_id = uuid.uuid4()
            # Written first, so a worker killed mid-claim still knows this run may be its own;
            # a claim that cannot be written down (state_dir full) is not made.
            try:
                ctx.journal.claiming(flow_run.id, transition_id)
            except OSError as exc:
                log.warning("flow_run.claim_skipped", reason="cannot write the claim journal in "
                            f"{ctx.journal.dir}: {exc.strerror or exc}")
                return False
            try:
                result = await ctx.states.propose_pending(flow_run.id, transition_id)
            except NotFound:
                log.info("flow_run.claim_skipped", reason="flow run was deleted")
                ctx.journal.forget(flow_run.id)
                return False
            except APIError as exc:
                # The proposal may have been written before the connection broke: read back.
                return await self._owns_claim(run, transition_id, str(exc))
            status = result.status
            ctx.metrics.claim(status.value)
            if status is OrchestrationStatus.ACCEPT:
                # Under load another worker can claim, run and finish a run between our poll
                # and our claim: then put its final state back instead of running it twice.
                # (One read of the history after the claim settles this; a read before it
                # would only narrow the window, at a request per run.)
                if not await restore_if_reopened(ctx.states, flow_run.id, log, "claim"):
                    run.claimed(transition_id)
                    log.info("flow_run.claimed", outcome="ACCEPT")
                    ctx.metrics.run_event("claimed")
                    ctx.states.post_log(flow_run.id, 20, "claimed the run")
                    return True
                ctx.journal.forget(flow_run.id)
                return False
            if status is OrchestrationStatus.WAIT:
                delay = result.details.delay_seconds or 1.0
                if time.monotonic() + delay > deadline:
                    log.info("flow_run.claim_released", outcome="WAIT",
                             reason=result.details.reason)
                    ctx.journal.forget(flow_run.id)
                    return False
                log.info("flow_run.claim_wait", outcome="WAIT", delay_seconds=delay,
                         reason=result.details.reason)
                await anyio.sleep(delay)
                continue
            if status is OrchestrationStatus.REJECT:
                # "This run has already made this state transition": a retry of a claim the
                # server had written before the answer was lost. Ours if the transition id is.
                state = result.state
                if state is None:
                    return await self._owns_claim(run, transition_id, "duplicate")
                if (state.type is StateType.PENDING
                        and state.state_details.transition_id == transition_id):
                    log.info("flow_run.claimed", outcome="DUPLICATE")
                    run.claimed(transition_id)
                    ctx.metrics.run_event("claimed")
                    return True
            _log_refused_claim(result, log)
            ctx.journal.forget(flow_run.id)
            return False

    async def _owns_claim(self, run: Run, transition_id: uuid.UUID, why: str) -> bool:
        ctx, flow_run_id, log = self.ctx, run.id, run.log
        try:
            current = await ctx.client.read_flow_run(flow_run_id)
        except APIError as exc:
            # Unknown: the journal keeps the claim and reconciliation settles it later.
            log.warning("flow_run.claim_unknown", error=why, read_back_error=str(exc))
            return False
        state = current.state
        ours = (
            state is not None
            and state.type is StateType.PENDING
            and state.state_details.transition_id == transition_id
        )
        log.info("flow_run.claimed" if ours else "flow_run.claim_lost", outcome="READ_BACK",
                 error=why)
        if ours:
            ctx.metrics.run_event("claimed")
            run.claimed(transition_id)
        else:
            ctx.journal.forget(flow_run_id)
        return ours


def _log_refused_claim(result: OrchestrationResult, log: FilteringBoundLogger) -> None:
    state = result.state
    log.info(
        "flow_run.claim_" + ("aborted" if result.status is OrchestrationStatus.ABORT
                             else "rejected"),
        outcome=result.status.value,
        reason=result.details.reason,
        server_state=f"{state.type.value}/{state.name}" if state else None,
    )
