"""The worker's roles (poller, claimer, supervisor, watchdog, shutdown, take-over, fencing)
against an in-memory API (httpx.MockTransport) and the FakeBackend: seconds, not minutes."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowhand.backends.base import Job, StopIntent
from flowhand.backends.fake import FakeBackend, Script
from flowhand.worker import Worker
from flowhand.worker.takeover import TAKEOVER_NAMESPACE
from tests.fake_api import POOL, FakeAPI, FakeRun, in_seconds, result, state
from tests.fake_worker import completes, run_worker, until

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def test_a_polled_run_is_claimed_started_and_left_completed(tmp_path: Path) -> None:
    """Poll, claim (PENDING with a transition id), label, start, watch: the flow's COMPLETED
    stands and nothing else is written over it."""
    api = FakeAPI()
    run = api.add_run()
    backend = FakeBackend(handler=completes(api))
    run_worker(api, backend, tmp_path)
    assert api.types(run) == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert run.labels["prefect.worker.name"] == "unit-worker"
    assert run.infrastructure_pid == "fake:1"
    assert [c.kind for c in backend.calls] == ["start", "wait"]


def test_a_claim_another_worker_won_is_left_alone(tmp_path: Path) -> None:
    """ABORT on the claim: the run is never started and the journal keeps nothing."""
    api = FakeAPI()
    run = api.add_run()
    api.scripts.append(lambda r, b: result("ABORT", r.state, "already PENDING"))
    backend = FakeBackend()
    worker = run_worker(api, backend, tmp_path)
    assert backend.calls == [] and api.types(run) == ["SCHEDULED"]
    assert worker.journal.entries() == []


def test_wait_is_honoured_then_the_claim_goes_on(tmp_path: Path) -> None:
    """WAIT with a delay: the claim is proposed again after it, then the run starts."""
    api = FakeAPI()
    run = api.add_run()
    answers = [result("WAIT", None, "slot busy", delay_seconds=0.1)]
    api.scripts.append(lambda r, b: answers.pop() if answers else None)
    run_worker(api, FakeBackend(handler=completes(api)), tmp_path)
    assert api.types(run)[-1] == "COMPLETED"


def test_a_lost_claim_answer_is_settled_by_reading_the_run_back(tmp_path: Path) -> None:
    """The connection breaks after the server wrote our PENDING: the read-back shows our
    transition id, so the run is ours and runs once."""
    api = FakeAPI()
    run = api.add_run()
    lost: list[bool] = []

    def write_then_break(r: FakeRun, body: dict[str, Any]) -> httpx.Response | None:
        if body["state"]["type"] == "PENDING" and not lost:
            lost.append(True)
            api.set(r, "PENDING", **body["state"]["state_details"])
            raise httpx.ReadError("connection reset")
        return None

    api.scripts.append(write_then_break)
    backend = FakeBackend(handler=completes(api))
    run_worker(api, backend, tmp_path)
    assert len(backend.started) == 1 and api.types(run)[-1] == "COMPLETED"


def test_a_claim_that_reopened_a_finished_run_puts_back_the_state_it_replaced(
        tmp_path: Path) -> None:
    """Another worker ran the run to COMPLETED and then reported CRASHED over a re-opening
    claim: our claim restores COMPLETED (the first final state after SCHEDULED), not CRASHED."""
    api = FakeAPI()
    run = api.add_run()

    def raced(r: FakeRun, body: dict[str, Any]) -> httpx.Response | None:
        if body["state"]["type"] != "PENDING":
            return None
        api.scripts.clear()
        for kind in ("PENDING", "RUNNING", "COMPLETED"):  # the other worker, since our poll
            api.set(r, kind)
        ours = state("PENDING", **body["state"]["state_details"])
        r.history.append(ours)
        api.set(r, "CRASHED")  # the other worker saw its process exit with the run PENDING
        return result("ACCEPT", ours)

    api.scripts.append(raced)
    backend = FakeBackend()
    run_worker(api, backend, tmp_path)
    assert backend.started == []
    assert api.types(run)[-3:] == ["PENDING", "CRASHED", "COMPLETED"]


def test_a_start_failure_is_crashed_with_the_reason(tmp_path: Path) -> None:
    """The backend cannot start the run: CRASHED, the launch error in the message."""
    api = FakeAPI()
    run = api.add_run()
    run_worker(api, FakeBackend(handler=Script(start_error="image not found: nope")), tmp_path)
    assert run.state["type"] == "CRASHED"
    assert "image not found: nope" in run.state["message"]


def test_an_exit_under_another_workers_claim_reports_nothing(tmp_path: Path) -> None:
    """Our process exits 0 while the run is PENDING under another worker's claim (it re-read
    and claimed it): no CRASHED is written over that claim."""
    api = FakeAPI()
    run = api.add_run()

    def other_claims(job: Job) -> Script:
        api.set(run, "PENDING", transition_id=uuid.uuid4())
        return Script(status_code=0)

    worker = run_worker(api, FakeBackend(handler=other_claims), tmp_path)
    assert api.types(run)[-1] == "PENDING"
    assert worker.metrics.flow_runs.labels(pool=POOL, backend="process", event="crashed") \
        ._value.get() == 0


def test_cancelling_a_running_run_stops_it_and_ends_cancelled(tmp_path: Path) -> None:
    """The watchdog sees CANCELLING, kills the infrastructure, and the run ends CANCELLED."""
    api = FakeAPI()
    run = api.add_run()
    backend = FakeBackend(handler=Script(runs_for=None))

    async def cancel(worker: Worker) -> None:
        await until(lambda: bool(backend.started))
        api.set(run, "CANCELLING")
        await until(lambda: run.state["type"] == "CANCELLED")

    run_worker(api, backend, tmp_path, cancel)
    assert backend.killed and backend.killed[0][0] == run.id


def test_maximum_run_time_relinquishes_and_crashes_naming_the_limit(tmp_path: Path) -> None:
    """Over max_run_seconds the engine is told to relinquish the run (not to crash it with
    its own message) and stopped; the run ends CRASHED naming the limit, not retried."""
    api = FakeAPI()
    run = api.add_run()
    backend = FakeBackend(handler=Script(runs_for=None))

    async def overtime(worker: Worker) -> None:
        await until(lambda: run.state["type"] == "CRASHED")

    run_worker(api, backend, tmp_path, overtime, max_run_seconds=0.2,
               retry_crashed={"max_retries": 2})
    assert backend.stop_intents == {run.id: StopIntent.RELINQUISH}
    assert "Maximum run time of 0.2 s exceeded" in run.state["message"]
    assert api.types(run).count("CRASHED") == 1


def test_shutdown_reschedule_hands_running_runs_back(tmp_path: Path) -> None:
    """[shutdown] mode = reschedule: each running run is stopped and handed back as
    AwaitingRetry for any worker to run again."""
    api = FakeAPI()
    run = api.add_run()
    backend = FakeBackend(handler=Script(runs_for=None))

    async def started(worker: Worker) -> None:
        await until(lambda: bool(backend.started))

    run_worker(api, backend, tmp_path, started, shutdown={"mode": "reschedule"})
    assert run.state["type"] == "SCHEDULED" and run.state["name"] == "AwaitingRetry"
    assert backend.killed


def test_a_lost_workers_lapsed_claim_is_handed_back_once(tmp_path: Path) -> None:
    """A run PENDING past the lease, claimed by a worker that is not online: handed back, with
    a transition id derived from the replaced state, so a second survivor's identical proposal
    is refused as a duplicate."""
    api = FakeAPI()
    run = api.add_run()
    api.set(run, "PENDING", transition_id=uuid.uuid4())
    run.history[-1]["timestamp"] = "2020-01-01T00:00:00+00:00"
    run.labels["prefect.worker.name"] = "gone"
    api.workers = [{"name": "gone", "status": "OFFLINE"}]
    backend = FakeBackend(handler=completes(api))

    async def taken(worker: Worker) -> None:
        await until(lambda: run.state["name"] == "AwaitingRetry" or
                    run.state["type"] == "COMPLETED")

    run_worker(api, backend, tmp_path, taken)
    handed = [s for s in run.history if s["name"] == "AwaitingRetry"]
    assert len(handed) == 1 and "'gone'" in handed[0]["message"]
    # Every survivor derives the same transition id from the state it replaces, so the
    # server's duplicate-transition rule refuses all but the first hand-back.
    replaced = run.history[run.history.index(handed[0]) - 1]
    assert handed[0]["state_details"]["transition_id"] == str(
        uuid.uuid5(TAKEOVER_NAMESPACE, replaced["id"]))


def test_a_live_workers_claim_is_not_taken_over(tmp_path: Path) -> None:
    """The claimant is ONLINE with a fresh heartbeat: its PENDING run is left alone."""
    api = FakeAPI()
    run = api.add_run("PENDING", transition_id=uuid.uuid4())
    run.history[-1]["timestamp"] = "2020-01-01T00:00:00+00:00"
    run.labels["prefect.worker.name"] = "alive"
    api.workers = [{"name": "alive", "status": "ONLINE", "heartbeat_interval_seconds": 30,
                    "last_heartbeat_time": state("X")["timestamp"]}]

    async def a_few_scans(worker: Worker) -> None:
        await until(lambda: api.requests.count(("POST", f"/work_pools/{POOL}/workers/filter"))
                    >= 3)

    run_worker(api, FakeBackend(), tmp_path, a_few_scans)
    assert api.types(run) == ["PENDING"]


def test_a_lapsed_claim_under_this_workers_stale_label_is_handed_back(tmp_path: Path) -> None:
    """A worker killed between its claim and its label leaves the label of the run's earlier
    attempt, here this (live) worker's: the claim is nobody's, so it is handed back."""
    api = FakeAPI()
    api.workers = [{"name": "unit-worker", "status": "ONLINE", "heartbeat_interval_seconds": 30,
                    "last_heartbeat_time": state("X")["timestamp"]}]
    backend = FakeBackend(handler=completes(api))
    runs: list[FakeRun] = []

    async def taken(worker: Worker) -> None:
        # After start-up, whose reconciliation settles what this worker left from before.
        await until(lambda: api.requests.count(("POST", f"/work_pools/{POOL}/get_scheduled_"
                                                        "flow_runs")) >= 2)
        run = api.add_run("PENDING", transition_id=str(uuid.uuid4()))
        run.history[-1]["timestamp"] = "2020-01-01T00:00:00+00:00"
        run.labels["prefect.worker.name"] = "unit-worker"
        runs.append(run)
        await until(lambda: any(s["name"] == "AwaitingRetry" for s in run.history))

    run_worker(api, backend, tmp_path, taken)
    handed = [s for s in runs[0].history if s["name"] == "AwaitingRetry"]
    assert "died before labelling it" in handed[0]["message"]


def test_a_lapsed_claim_that_reopened_a_finished_run_is_restored_whoever_is_labelled(
        tmp_path: Path) -> None:
    """A claim that landed after the run had COMPLETED, from a worker that died before undoing
    it, under the label of a live worker: the run gets its COMPLETED back, not a second run."""
    api = FakeAPI()
    run = api.add_run()
    api.set(run, "PENDING", transition_id=str(uuid.uuid4()))
    api.set(run, "RUNNING")
    api.set(run, "COMPLETED")
    api.set(run, "PENDING", transition_id=str(uuid.uuid4()))
    for entry, when in zip(run.history, ["2019-01-01", "2019-01-02", "2019-01-03", "2019-01-04",
                                         "2020-01-01"], strict=True):
        entry["timestamp"] = f"{when}T00:00:00+00:00"
    run.labels["prefect.worker.name"] = "alive"
    api.workers = [{"name": "alive", "status": "ONLINE", "heartbeat_interval_seconds": 30,
                    "last_heartbeat_time": state("X")["timestamp"]}]
    backend = FakeBackend(handler=completes(api))

    async def restored(worker: Worker) -> None:
        await until(lambda: run.state["type"] == "COMPLETED")

    run_worker(api, backend, tmp_path, restored)
    assert api.types(run)[-2:] == ["PENDING", "COMPLETED"] and not backend.started


def test_a_take_over_that_raced_a_newer_claim_puts_that_claim_back(tmp_path: Path) -> None:
    """Between the take-over's read and its hand-back the run was claimed again (another
    survivor handed it back first): the hand-back replaced that newer claim, so the claim is put
    back as it was, with its transition id, and the run is not counted as taken over."""
    api = FakeAPI()
    run = api.add_run()
    api.set(run, "PENDING", transition_id=str(uuid.uuid4()))
    run.history[0]["timestamp"] = "2019-01-01T00:00:00+00:00"
    run.history[-1]["timestamp"] = "2020-01-01T00:00:00+00:00"
    run.labels["prefect.worker.name"] = "gone"
    api.workers = [{"name": "gone", "status": "OFFLINE"}]
    newer = str(uuid.uuid4())

    def claimed_meanwhile(r: FakeRun, body: dict[str, Any]) -> None:
        if body["state"].get("name") == "AwaitingRetry" and len(r.history) == 2:
            r.history.append(state("PENDING", transition_id=newer))

    api.scripts.append(claimed_meanwhile)

    async def put_back(worker: Worker) -> None:
        await until(lambda: len(run.history) >= 5)

    worker = run_worker(api, FakeBackend(handler=completes(api)), tmp_path, put_back)
    assert api.types(run)[:5] == ["SCHEDULED", "PENDING", "PENDING", "SCHEDULED", "PENDING"]
    assert run.history[4]["state_details"]["transition_id"] == newer
    assert worker.metrics.flow_runs.labels(
        pool=POOL, backend="process", event="taken_over")._value.get() == 0


def test_a_worker_silent_for_half_the_lease_rereads_before_starting(tmp_path: Path) -> None:
    """Self-fencing: a claim older than half the lease is read again before the start; the
    fleet handed it back meanwhile, so it is dropped, not run."""
    api = FakeAPI()
    run = api.add_run(scheduled_time=in_seconds(1.5))
    backend = FakeBackend()

    def hand_back_when_claimed(r: FakeRun, body: dict[str, Any]) -> httpx.Response | None:
        if body["state"]["type"] == "PENDING":
            api.scripts.clear()
            new = state("PENDING", **body["state"]["state_details"])
            r.history.append(new)
            r.history.append(state("SCHEDULED", "AwaitingRetry"))
            return result("ACCEPT", new)
        return None

    api.scripts.append(hand_back_when_claimed)
    worker = run_worker(api, backend, tmp_path, prefetch_seconds=5)
    assert backend.started == [] and run.state["name"] == "AwaitingRetry"
    assert worker.metrics.flow_runs.labels(pool=POOL, backend="process", event="fenced") \
        ._value.get() == 1

