"""The process backend's output channel and the output pump, with real processes and pipes and
no server: nothing lost across a reader's restart, no SIGPIPE for the run, stale pipes cleaned,
dropped output counted."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import pytest

from flowhand.backends.output import OutputPump
from flowhand.backends.process import output_pipe
from flowhand.backends.process.output_pipe import (
    OutputPipe,
    RunOutput,
    clean_runs_dir,
    fifo_path,
    open_run_output,
    reopen_run_output,
)

#: A child that prints numbered lines, a slice at a time, then "end".
PRINTER = """
import sys, time
for i in range(int(sys.argv[1])):
    sys.stdout.write("line %07d %s\\n" % (i, "y" * 40))
    if i % 5000 == 0:
        sys.stdout.flush(); time.sleep(0.01)
print("end", flush=True)
"""


def spawn(output: RunOutput, lines: int) -> subprocess.Popen[bytes]:
    assert output.writer is not None
    process = subprocess.Popen([sys.executable, "-c", PRINTER, str(lines)],
                               stdout=output.writer, stderr=subprocess.STDOUT,
                               start_new_session=True)
    output.close_writer()
    return process


def drain(source: OutputPipe, seconds: float) -> bytes:
    """Read whatever comes for `seconds` (or until the end)."""

    async def main() -> bytes:
        got = []
        with anyio.move_on_after(seconds):
            while not source.eof:
                await source.wait(0.1)
                got.append(await source.read(final=False))
        got.append(await source.read(final=True))
        return b"".join(got)

    return anyio.run(main)


def expected(lines: int) -> bytes:
    return b"".join(b"line %07d %s\n" % (i, b"y" * 40) for i in range(lines)) + b"end\n"


def test_a_reader_restart_loses_nothing_and_never_breaks_the_run(tmp_path: Path) -> None:
    """The run prints 6 MB into its FIFO (0600 whatever the umask); the first reader goes away
    mid-way (a worker killed), the run waits on a full pipe instead of dying, and a second
    reader opening the FIFO by name gets the rest: every byte once, in order, exit 0."""
    run_id = uuid.uuid4()
    old = os.umask(0o077 ^ 0o777)  # a umask that would leave no owner bits
    try:
        output = open_run_output(tmp_path, run_id, 1 << 20)
    finally:
        os.umask(old)
    assert output.path == fifo_path(tmp_path, run_id)
    info = output.path.stat()
    assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    lines = 110_000
    process = spawn(output, lines)
    assert isinstance(output.source, OutputPipe)
    first = drain(output.source, 0.3)
    output.close()  # the worker is gone; the FIFO stays
    time.sleep(1.0)
    assert process.poll() is None, "the run must wait for a reader, not die"
    again = reopen_run_output(tmp_path, run_id, process.pid)
    assert again is not None and isinstance(again.source, OutputPipe)
    rest = drain(again.source, 30)
    assert process.wait(10) == 0
    assert again.source.eof
    assert first + rest == expected(lines)
    assert os.path.getsize(output.path) == 0, "a FIFO keeps nothing on disk"
    again.remove()
    assert not output.path.exists()


def test_without_a_fifo_the_run_gets_an_anonymous_pipe_found_again_through_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No inode left for the FIFO: the run still starts, on an anonymous pipe, and a restarted
    reader finds it through /proc/<pid>/fd/1."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_pipe.os, "mkfifo", no_space)
    run_id = uuid.uuid4()
    output = open_run_output(tmp_path, run_id, 1 << 16)
    assert output.path is None and list(tmp_path.iterdir()) == []
    process = spawn(output, 30_000)
    output.close()
    again = reopen_run_output(tmp_path, run_id, process.pid)
    assert again is not None and isinstance(again.source, OutputPipe)
    got = drain(again.source, 30)
    assert process.wait(10) == 0
    assert got == expected(30_000)


def test_stale_pipes_and_files_are_cleaned_and_live_ones_kept(tmp_path: Path) -> None:
    """At start-up: a FIFO no run holds, an old output file nobody has open and a temporary
    file are removed; a running run's FIFO and an old output file a process still writes stay."""
    live = open_run_output(tmp_path, uuid.uuid4(), 1 << 16)
    assert live.writer is not None and live.path is not None
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                               stdout=live.writer)
    live.close()
    stale = open_run_output(tmp_path, uuid.uuid4(), 1 << 16)
    assert stale.path is not None
    stale.close()
    old_stale = tmp_path / f"{uuid.uuid4()}.log"
    old_stale.write_text("done\n")
    old_live = tmp_path / f"{uuid.uuid4()}.log"
    holder = old_live.open("ab")
    tmp = tmp_path / "x.tmp"
    tmp.write_text("")
    try:
        removed = clean_runs_dir(tmp_path)
        assert sorted(removed) == sorted([stale.path.name, old_stale.name, tmp.name])
        assert live.path.exists() and old_live.exists()
        assert reopen_run_output(tmp_path, uuid.UUID(old_live.stem), process.pid) is not None
    finally:
        holder.close()
        process.kill()
        process.wait()
    # Once nothing holds them, they are stale too.
    assert sorted(clean_runs_dir(tmp_path)) == sorted([live.path.name, old_live.name])
    assert list(tmp_path.iterdir()) == []


class BrokenStdout(io.RawIOBase):
    """A stdout on a full disk."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_output_flowhand_cannot_pass_on_is_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """flowhand's own stdout fails (ENOSPC): the run is unaffected (exit 0), every byte is
    counted as dropped with the reason, and the crash tail is still kept."""
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(BrokenStdout())))
    output = open_run_output(tmp_path, uuid.uuid4(), 1 << 16)
    process = spawn(output, 20_000)
    drops: list[tuple[int, str]] = []
    pump = OutputPump(output.source, stream_output=True, sink=None, tail_lines=2,
                      min_seconds=0.01, max_seconds=0.5,
                      on_dropped=lambda size, why: drops.append((size, why)))

    async def main() -> list[str]:
        async with pump.following():
            while process.poll() is None:  # noqa: ASYNC110 - a child of this test
                await anyio.sleep(0.05)
        return await pump.finish()

    tail = anyio.run(main)
    assert process.returncode == 0
    assert tail == [f"line {19_999:07d} {'y' * 40}", "end"]
    assert pump.dropped == len(expected(20_000)) == sum(size for size, _ in drops)
    assert all("No space left on device" in why for _, why in drops)
    output.remove()


def test_a_quiet_pipe_costs_no_reads(tmp_path: Path) -> None:
    """A run that prints nothing is not looked at until it does: the pump wakes on output."""
    output = open_run_output(tmp_path, uuid.uuid4(), 1 << 16)
    assert output.writer is not None
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1.0); print('late', flush=True)"],
        stdout=output.writer)
    output.close_writer()
    lines: list[str] = []
    pump = OutputPump(output.source, stream_output=False, sink=lines.extend, tail_lines=5,
                      min_seconds=0.01, max_seconds=30)
    reads = 0
    source = output.source
    assert isinstance(source, OutputPipe)
    real_read = source.read

    async def counting(final: bool) -> bytes:
        nonlocal reads
        reads += 1
        return await real_read(final)

    source.read = counting  # type: ignore[method-assign]

    async def main() -> float:
        started = time.monotonic()
        async with pump.following():
            while not lines:  # noqa: ASYNC110 - the pump fills it
                await anyio.sleep(0.01)
        return time.monotonic() - started

    took = anyio.run(main)
    process.wait()
    assert lines == ["late"] and 0.9 < took < 5
    assert reads <= 2, reads
    output.remove()


def test_a_sink_that_wants_no_more_costs_no_more_splitting(tmp_path: Path) -> None:
    """The run-logs sink returns False once its budget is spent: the pump stops splitting lines
    for it, and goes on keeping the crash tail."""
    output = open_run_output(tmp_path, uuid.uuid4(), 1 << 16)
    process = spawn(output, 50_000)
    calls: list[int] = []

    def sink(lines: list[str]) -> bool:
        calls.append(len(lines))
        return False

    pump = OutputPump(output.source, stream_output=False, sink=sink, tail_lines=1,
                      min_seconds=0.01, max_seconds=0.5)

    async def main() -> list[str]:
        async with pump.following():
            while process.poll() is None:  # noqa: ASYNC110 - a child of this test
                await anyio.sleep(0.05)
        return await pump.finish()

    assert anyio.run(main) == ["end"]
    assert len(calls) == 1
    output.remove()
