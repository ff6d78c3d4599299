"""Reading a run's state history: did a claim re-open a run that had already finished?

The server accepts PENDING from a final state whose result was not persisted, so a claim sent
from an older poll can re-open a run another worker has just finished. The run's true end is
then the first final state after its last SCHEDULED state (the one the poll saw, or a retry's):
any final state after that first one was written over the re-opened run (for example a worker
that saw its process exit with the run PENDING). Timestamps are taken when a request arrives,
not when it commits, so "after the last SCHEDULED state" is the only order relied on.
"""

from __future__ import annotations

import uuid

from flowhand.api.models import State, StateType
from flowhand.errors import APIError
from flowhand.worker.states import StateWriter


def replaced_final_state(history: list[State]) -> State | None:
    """The final state a re-opening claim replaced, or None when the run never finished."""
    scheduled = [s.timestamp for s in history
                 if s.type is StateType.SCHEDULED and s.timestamp is not None]
    if not scheduled:
        return None
    since = max(scheduled)
    finished = [s for s in history if s.type.is_final and s.timestamp is not None
                and s.timestamp > since]
    return min(finished, key=lambda s: s.timestamp or since) if finished else None


def replaced_by(history: list[State], state_id: uuid.UUID) -> State | None:
    """The state that the one with `state_id` replaced (the one before it, oldest first), or
    None when it is the first or not in the history."""
    ids = [s.id for s in history]
    if state_id not in ids or ids.index(state_id) == 0:
        return None
    return history[ids.index(state_id) - 1]


async def restore_if_reopened(
    states: StateWriter, flow_run_id: uuid.UUID, why: str
) -> bool:
    """Put back the final state a claim replaced; True when the run had finished.

    Unknown (the history cannot be read) counts as "not finished": callers then go on as
    they would without this check, and a later pass checks again.
    """
    log = states.log
    try:
        history = await states.client.read_flow_run_states(flow_run_id)
    except APIError as exc:
        log.warning("flow_run.history_unread", error=str(exc), during=why)
        return False
    previous = replaced_final_state(history)
    if previous is None:
        return False
    await states.set_state(flow_run_id, previous.type, name=previous.name,
                           message=previous.message, force=True)
    log.warning("flow_run.claim_undone", reason="the run had already finished",
                restored=previous.type.value, found_by=why)
    return True
