"""Take-over: hand back the claims of workers that are gone, so no run stays PENDING for good.

A worker killed between its claim and its start leaves the run PENDING with no infrastructure;
if it never comes back, nobody would run it (Prefect's workers leave it too). Every
`takeover_interval_seconds` each worker looks at its pool's PENDING runs. A run PENDING longer
than `claim_lease_seconds` whose claimant is not an ONLINE worker of the pool (by its label; an
unlabelled claim past the lease counts as lost) gets its final state put back when the claim
re-opened a finished run, and is otherwise handed back (AwaitingRetry, due now) when it has no
`infrastructure_pid`. The label can be stale: a worker killed between its claim and its label
leaves the label of the run's previous attempt. So a lapsed claim labelled with this worker's
own name that it does not hold (its journal was reconciled at start) counts as lost too, and a
lapsed claim that re-opened a finished run gets its final state back whoever is labelled: no
worker runs a re-opened run (its claimer undoes the claim at once).

Surviving workers race for the same runs, so each hand-back is proposed without force and with
a transition id derived from the PENDING state it replaces: the server refuses the second
identical proposal as a duplicate transition, and exactly one worker wins. The scan costs one
filtered read per interval on an idle pool.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta

import anyio
from structlog.typing import FilteringBoundLogger

from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import FlowRun, OrchestrationStatus, PoolWorker, State, StateType
from flowhand.api.pagination import collect
from flowhand.clock import utcnow
from flowhand.config import Config
from flowhand.errors import APIError, NotFound
from flowhand.logs import run_log, run_logging
from flowhand.service_loop import service_loop, sleep_unless
from flowhand.worker.history import replaced_by, restore_if_reopened
from flowhand.worker.runs import RunReport, RunReports, RunTable, pool_of
from flowhand.worker.states import StateWriter

#: The namespace of take-over transition ids (uuid5 of the replaced PENDING state's id).
TAKEOVER_NAMESPACE = uuid.UUID("6f1d3c3e-3b0a-4c5e-9a59-1f0c2b7e4d21")
#: Prefect's foreman marks a worker OFFLINE after this many missed heartbeat intervals.
INACTIVITY_HEARTBEAT_MULTIPLE = 3


def lapsed_claims(runs: list[FlowRun], lease: timedelta, now: datetime) -> list[FlowRun]:
    """PENDING runs whose claim is older than the lease."""
    return [r for r in runs
            if r.state is not None and r.state.type is StateType.PENDING
            and r.state.timestamp is not None and now - r.state.timestamp > lease]


def online_workers(workers: list[PoolWorker], now: datetime) -> set[str]:
    """Names of the pool's workers that are ONLINE and have sent a heartbeat lately."""
    alive = set()
    for worker in workers:
        if worker.status != "ONLINE" or worker.last_heartbeat_time is None:
            continue
        interval = worker.heartbeat_interval_seconds or 30
        if now - worker.last_heartbeat_time <= timedelta(
                seconds=interval * INACTIVITY_HEARTBEAT_MULTIPLE):
            alive.add(worker.name)
    return alive


class Takeover:
    def __init__(self, *, config: Config, client: PrefectClient, runs: RunTable,
                 states: StateWriter, reports: RunReports, log: FilteringBoundLogger,
                 stop: anyio.Event) -> None:
        self.config = config
        self.pool_name = pool_of(config)
        self.client = client
        self.runs = runs
        self.states = states
        #: Where a take-over is counted and said in the run's logs (the observers).
        self.reports = reports
        self.log = log
        #: Set when the worker stops.
        self.stop = stop

    async def run(self) -> None:
        """Scan every `takeover_interval_seconds` until the worker stops."""
        # Workers started together scan at different moments, so they rarely race at all.
        await sleep_unless(self.stop, self.config.takeover_interval_seconds * random.random())

        async def step() -> None:
            await self.scan()

        await service_loop(
            step, interval=self.config.takeover_interval_seconds, retry_on=(APIError,),
            on_failure=lambda exc, delay, n: self.log.debug("takeover.scan_failed",
                                                            error=str(exc)),
            stop=self.stop)

    async def scan(self) -> int:
        """Hand back the lapsed claims of lost workers; return how many this worker took."""
        query = FlowRunFilter(states=[StateType.PENDING], pool=self.pool_name)
        pending = await collect(self.client.read_flow_runs, query.body())
        lease = timedelta(seconds=self.config.claim_lease_seconds)
        lapsed = [r for r in lapsed_claims(pending, lease, utcnow()) if r.id not in self.runs]
        if not lapsed:
            return 0
        # Not this worker: a claim under its own label that it does not hold is nobody's.
        alive = online_workers(await self.client.read_workers(self.pool_name), utcnow()) - {
            self.config.name}
        taken = 0
        for flow_run in lapsed:
            claimant = flow_run.worker_name
            log = self.log.bind(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name,
                                lost_worker=claimant)
            # A live worker's claim is its own to settle, unless it re-opened a finished run.
            with run_logging(log):
                if await self._take_over(flow_run, claimant, hand_back=claimant not in alive):
                    taken += 1
        return taken

    async def _take_over(self, seen: FlowRun, claimant: str | None, hand_back: bool) -> bool:
        # Read again just before proposing: the narrower this window, the rarer a race
        # with a worker that polls and claims the run between two survivors' proposals.
        if await self._read_again(seen) is None:
            return False
        if await restore_if_reopened(self.states, seen.id, "takeover"):
            self.reports.publish(RunReport(seen.id, counted="final_restored"))
            return True
        if not hand_back:
            return False
        # The history read above takes a while under load: read once more, right before.
        current = await self._read_again(seen)
        if current is None or current.infrastructure_pid:
            # Infrastructure was started for it (perhaps still starting): not a lost claim.
            # (A pid left from an earlier attempt of a re-opened run is handled just above.)
            return False
        return await self._hand_back(seen, claimant)

    async def _read_again(self, seen: FlowRun) -> FlowRun | None:
        """The run as it is now, if it still holds the lapsed claim it had when `seen`."""
        log = run_log(self.log)
        assert seen.state is not None
        try:
            current = await self.client.read_flow_run(seen.id)
        except (NotFound, APIError) as exc:
            log.debug("takeover.skipped", error=str(exc))
            return None
        if current.state is None or current.state.id != seen.state.id:
            return None
        return current

    async def _hand_back(self, seen: FlowRun, claimant: str | None) -> bool:
        """Propose the hand-back; exactly one survivor wins (the transition id is the same)."""
        log = run_log(self.log)
        assert seen.state is not None
        if claimant == self.config.name or not claimant:
            who = "a worker that died before labelling it"
        else:
            who = f"worker {claimant!r}, which is no longer online,"
        message = (f"flowhand worker {self.config.name!r} handed this run back to the pool: it "
                   f"was claimed by {who} and not started within the claim lease of "
                   f"{self.config.claim_lease_seconds:g} s")
        try:
            result = await self.states.propose_hand_back(
                seen.id, message, uuid.uuid5(TAKEOVER_NAMESPACE, str(seen.state.id)))
        except APIError as exc:
            log.warning("takeover.failed", error=str(exc))
            return False
        if result.status is not OrchestrationStatus.ACCEPT:
            log.info("takeover.lost_race", outcome=result.status.value,
                     reason=result.details.reason)
            return False
        if await self._put_back_a_newer_claim(seen, result.state):
            return False
        log.warning("flow_run.taken_over", reason=message)
        self.reports.publish(RunReport(seen.id, counted="taken_over", line=(30, message)))
        return True

    async def _put_back_a_newer_claim(self, seen: FlowRun, ours: State | None) -> bool:
        """True when the hand-back replaced a newer state than the lapsed claim (another survivor
        handed the run back and a worker claimed it again, perhaps started it, between our read
        and our proposal): that state is put back as it was, so its worker runs the run and
        nobody else does."""
        assert seen.state is not None
        if ours is None or ours.id is None:
            return False
        try:
            replaced = replaced_by(await self.client.read_flow_run_states(seen.id), ours.id)
        except APIError:
            return False
        if replaced is None or replaced.id == seen.state.id:
            return False
        await self.states.set_state(
            seen.id, replaced.type, name=replaced.name, message=replaced.message,
            force=True, transition_id=replaced.state_details.transition_id)
        run_log(self.log).warning("takeover.undone", reason="the run was claimed again "
                                  f"meanwhile; its {replaced.type.value} state is put back")
        return True
