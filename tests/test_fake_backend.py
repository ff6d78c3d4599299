"""The FakeBackend that worker unit tests use: scripted exits, recorded calls, reattach rules."""

from __future__ import annotations

import time
import uuid

import anyio
import pytest

from flowhand.api.models import FlowRun, WorkPool
from flowhand.backends.base import Job, JobConfig
from flowhand.backends.fake import FakeBackend, FakeHandle, Script
from flowhand.config import create_backend, load_config
from flowhand.errors import BackendUnavailable, LaunchFailed


def make_job(lines: list[str] | None = None, name: str = "fake-run") -> Job:
    run_id = uuid.uuid4()
    sink = lines.extend if lines is not None else None
    return Job(
        flow_run=FlowRun(id=run_id, name=name, flow_id=uuid.uuid4()),
        flow_name="flow", deployment=None,
        pool=WorkPool(id=uuid.uuid4(), name="pool", type="process"),
        worker_name="w", config=JobConfig(), env={}, labels={}, command="true",
        output_sink=sink,
    )


async def no_record(pid: str) -> None:
    pass


def test_default_run_exits_zero_and_calls_are_recorded() -> None:
    """Without a script a run exits 0 at once; start records the pid before returning, and every
    call is recorded in order."""
    backend = FakeBackend()
    job = make_job()
    recorded: list[str] = []

    async def record(pid: str) -> None:
        recorded.append(pid)

    async def main() -> None:
        handle = await backend.start(job, record)
        exit_ = await backend.wait(handle)
        assert exit_.status_code == 0 and exit_.output_tail == []
        assert recorded == [handle.infrastructure_pid] == ["fake:1"]

    anyio.run(main)
    assert [(c.kind, c.flow_run_id) for c in backend.calls] == [
        ("start", job.flow_run_id), ("wait", job.flow_run_id)]
    assert backend.started == [job]


def test_scripted_exit_output_and_launch_failure() -> None:
    """A handler scripts each run: its status, explanation, output (to the sink and the tail),
    or a LaunchFailed from start."""

    def handler(job: Job) -> Script:
        if job.flow_run.name == "broken":
            return Script(start_error="no such image")
        return Script(status_code=3, explanation="it broke", output=["a", "", "b", "c"])

    backend = FakeBackend(handler=handler, tail_lines=2)
    lines: list[str] = []
    job = make_job(lines)
    broken = make_job(name="broken")

    async def main() -> None:
        exit_ = await backend.wait(await backend.start(job, no_record))
        assert (exit_.status_code, exit_.explanation, exit_.output_tail) == (3, "it broke",
                                                                             ["b", "c"])
        with pytest.raises(LaunchFailed, match="no such image"):
            await backend.start(broken, no_record)

    anyio.run(main)
    assert lines == ["a", "", "b", "c"]
    assert backend.started == [job]
    assert [c.kind for c in backend.calls] == ["start", "wait", "start"]
    assert isinstance(backend.calls[-1].detail, LaunchFailed)


def test_kill_ends_a_long_run_politely_or_after_the_grace() -> None:
    """A run that runs until killed ends at once with -15 on kill, or with -9 after the grace
    period when it ignores the polite signal; killing an ended run is not an error."""
    polite = FakeBackend(handler=Script(runs_for=None, explanation="unused"))
    stubborn = FakeBackend(handler=Script(runs_for=None, ignores_term=True))

    async def main() -> None:
        for backend, grace, status in ((polite, 5.0, -15), (stubborn, 0.2, -9)):
            handle = await backend.start(make_job(), no_record)
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.kill, handle, grace)
                started = time.monotonic()
                exit_ = await backend.wait(handle)
            assert exit_.status_code == status and exit_.explanation is None
            assert time.monotonic() - started < 2
            await backend.kill(handle, grace)
            assert [g for _, g in backend.killed] == [grace, grace]

    anyio.run(main)


def test_reattach_finds_only_live_runs_of_the_same_flow_run() -> None:
    """reattach returns adopted or started runs that have not ended, for the same flow run id
    only; every attempt is recorded."""
    backend = FakeBackend()
    run_id = uuid.uuid4()
    backend.adopt("fake:99", run_id, Script(status_code=7))

    async def main() -> None:
        assert await backend.reattach("fake:99", uuid.uuid4()) is None
        assert await backend.reattach("fake:100", run_id) is None
        handle = await backend.reattach("fake:99", run_id)
        assert isinstance(handle, FakeHandle)
        assert (await backend.wait(handle)).status_code == 7
        assert await backend.reattach("fake:99", run_id) is None  # it ended

    anyio.run(main)
    assert [pid for pid, _ in backend.reattached] == ["fake:99", "fake:100", "fake:99", "fake:99"]
    assert [c.kind for c in backend.calls] == ["reattach", "reattach", "reattach", "wait",
                                               "reattach"]


def test_check_fails_while_unavailable_and_core_can_build_it() -> None:
    """check() raises BackendUnavailable while `unavailable` is set; the core's create_backend
    builds it from a Config like any backend."""
    backend = create_backend(FakeBackend, load_config(None, {"pool": "p"}, environ={}))
    assert isinstance(backend, FakeBackend)
    backend.unavailable = "the daemon is down"

    async def main() -> None:
        with pytest.raises(BackendUnavailable, match="daemon is down"):
            await backend.check()
        backend.unavailable = None
        await backend.check()

    anyio.run(main)
