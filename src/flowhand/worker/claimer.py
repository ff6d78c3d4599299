"""The claim: propose PENDING, act on ACCEPT / REJECT / ABORT / WAIT, and never claim twice.

Each proposal carries a fresh transition id, written to the journal first, so a worker killed
mid-claim still knows the run may be its own. An answer lost in transit is settled by reading
the run back: the claim is ours exactly when the run is PENDING with our transition id.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.models import OrchestrationResult, OrchestrationStatus, State, StateType
from flowhand.errors import APIError, NotFound
from flowhand.journal import Journal
from flowhand.metrics import Metrics
from flowhand.worker.history import restore_if_reopened
from flowhand.worker.runs import Run, RunPhase
from flowhand.worker.states import StateWriter

#: How long a claim may be told to WAIT before the run is left for a later poll.
CLAIM_WAIT_LIMIT_SECONDS = 60.0


class Claimer:
    def __init__(self, client: PrefectClient, states: StateWriter, journal: Journal,
                 metrics: Metrics) -> None:
        self.client = client
        self.states = states
        self.journal = journal
        self.metrics = metrics

    async def claim(self, run: Run) -> bool:
        """Propose PENDING; True only when this worker now owns the run."""
        deadline = time.monotonic() + CLAIM_WAIT_LIMIT_SECONDS
        while True:
            transition_id = uuid.uuid4()
            if not self._write_down(run, transition_id):
                return False
            try:
                result = await self.states.propose_pending(run.id, transition_id)
            except NotFound:
                return self._release(run, "flow_run.claim_skipped", reason="flow run was deleted")
            except APIError as exc:
                # The proposal may have been written before the connection broke: read back.
                return await self._owns_claim(run, transition_id, str(exc))
            self.metrics.claim(result.status.value)
            if result.status is not OrchestrationStatus.WAIT:
                return await self._settle(run, transition_id, result)
            if not await self._wait(run, result, deadline):
                return False

    def _write_down(self, run: Run, transition_id: uuid.UUID) -> bool:
        """Journal the proposal first, so a worker killed mid-claim still knows this run may be
        its own; a claim that cannot be written down (state_dir full) is not made."""
        journal = self.journal
        try:
            journal.claiming(run.id, transition_id)
        except OSError as exc:
            run.log.warning("flow_run.claim_skipped", reason="cannot write the claim journal in "
                            f"{journal.dir}: {exc.strerror or exc}")
            return False
        return True

    async def _wait(self, run: Run, result: OrchestrationResult, deadline: float) -> bool:
        """Honour a WAIT answer; False (the claim released) when it would pass the deadline."""
        delay = result.details.delay_seconds or 1.0
        if time.monotonic() + delay > deadline:
            return self._release(run, "flow_run.claim_released", outcome="WAIT",
                                 reason=result.details.reason)
        run.log.info("flow_run.claim_wait", outcome="WAIT", delay_seconds=delay,
                     reason=result.details.reason)
        await anyio.sleep(delay)
        return True

    async def _settle(self, run: Run, transition_id: uuid.UUID,
                      result: OrchestrationResult) -> bool:
        """Act on an ACCEPT, REJECT or ABORT answer to the proposal."""
        if result.status is OrchestrationStatus.ACCEPT:
            # Under load another worker can claim, run and finish a run between our poll
            # and our claim: then put its final state back instead of running it twice.
            # (One read of the history after the claim settles this; a read before it
            # would only narrow the window, at a request per run.)
            if await restore_if_reopened(self.states, run.id, run.log, "claim"):
                run.enter(RunPhase.DONE)
                return False
            return self._ours(run, transition_id, outcome="ACCEPT")
        if result.status is OrchestrationStatus.REJECT:
            # "This run has already made this state transition": a retry of a claim the
            # server had written before the answer was lost. Ours if the transition id is.
            if result.state is None:
                return await self._owns_claim(run, transition_id, "duplicate")
            if _is_claim(result.state, transition_id):
                return self._ours(run, transition_id, outcome="DUPLICATE")
        _log_refused_claim(result, run.log)
        run.enter(RunPhase.DONE)
        return False

    async def _owns_claim(self, run: Run, transition_id: uuid.UUID, why: str) -> bool:
        try:
            current = await self.client.read_flow_run(run.id)
        except APIError as exc:
            # Unknown: the journal keeps the claim and reconciliation settles it later.
            run.log.warning("flow_run.claim_unknown", error=why, read_back_error=str(exc))
            return False
        if current.state is not None and _is_claim(current.state, transition_id):
            return self._ours(run, transition_id, outcome="READ_BACK", error=why)
        return self._release(run, "flow_run.claim_lost", outcome="READ_BACK", error=why)

    @staticmethod
    def _ours(run: Run, transition_id: uuid.UUID, **fields: Any) -> bool:
        """The claim is ours: the observers log it, count it and say it in the run's logs."""
        run.claimed(transition_id)
        run.enter(RunPhase.CLAIMED, "claimed", **fields)
        return True

    @staticmethod
    def _release(run: Run, event: str, **fields: Any) -> bool:
        """The claim is not (or no longer) ours: say why, and forget it."""
        run.log.info(event, **fields)
        run.enter(RunPhase.DONE)
        return False


def _is_claim(state: State, transition_id: uuid.UUID) -> bool:
    """Whether `state` is the PENDING this worker proposed with `transition_id`."""
    return state.type is StateType.PENDING and state.state_details.transition_id == transition_id


def _log_refused_claim(result: OrchestrationResult, log: FilteringBoundLogger) -> None:
    state = result.state
    log.info(
        "flow_run.claim_" + ("aborted" if result.status is OrchestrationStatus.ABORT
                             else "rejected"),
        outcome=result.status.value,
        reason=result.details.reason,
        server_state=f"{state.type.value}/{state.name}" if state else None,
    )
