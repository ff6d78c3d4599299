"""What copying a run's output costs the worker: CPU seconds of the worker process per MB.

    PYTHONPATH=src .venv/bin/python -m bench.output_cost [--mb 200] [--repeat 3]

A child process prints `--mb` MB of 64-byte lines as fast as it can; the worker side is the
process backend's real output path (the run's FIFO and the OutputPump, with the backend's look
intervals) run in this process, whose own CPU time (user + system, children excluded) is
measured around it. Variants:

* `pipe, stream_output`: the default: every byte copied to flowhand's stdout (/dev/null here);
* `pipe, drain only`: stream_output off and no forwarding (a re-attached run): read, keep the tail;
* `pipe, forward_output`: lines split for the run's logs (a sink that drops them, so only the
  splitting is measured; the run logs themselves stop at `[run_logs] max_output_bytes`);
* `file, stream_output (before)`: what flowhand did before the FIFO: the run writes to a file
  on disk (which grows without bound), the pump polls it, copies to stdout and splits every
  chunk into lines for the tail (the pump of commit 09031e0, `BeforePump` below);
* `file, stream_output (before, today's pump)`: the same file with today's pump, to tell the
  source's cost from the pump's.

Prints a Markdown table (the figures in docs/bench.md come from it).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio

from flowhand.backends.output import OutputPump, OutputSource, split_lines
from flowhand.backends.process.backend import OUTPUT_POLL_MAX_SECONDS, OUTPUT_POLL_MIN_SECONDS
from flowhand.backends.process.output_file import OutputFile
from flowhand.backends.process.output_pipe import open_run_output

WRITER = """
import sys
line = b"%s\\n" % (b"x" * 63)
block = line * (1 << 14)   # 1 MiB
out = sys.stdout.buffer
for _ in range(int(sys.argv[1])):
    out.write(block)
out.flush()
"""


class BeforePump(OutputPump):
    """The pump as it was before the FIFO: every chunk split into lines for the tail."""

    @property
    def reads_along(self) -> bool:
        return self.forwarding

    async def pump(self, final: bool = False) -> int:
        data = await self.source.read(final)
        if not data:
            return 0
        if self.stream_output:
            sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
            sys.stdout.flush()
        lines = split_lines(data)
        self._recent.extend(line for line in lines if line.strip())
        if self.sink is not None:
            self.sink(lines)
        return len(data)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def follow(source: OutputSource, process: subprocess.Popen[bytes], stream: bool,
                 sink: Callable[[list[str]], None] | None, pump_type: type[OutputPump]) -> int:
    pump = pump_type(source, stream_output=stream, sink=sink, tail_lines=20,
                     min_seconds=OUTPUT_POLL_MIN_SECONDS, max_seconds=OUTPUT_POLL_MAX_SECONDS)
    async with pump.following():
        while process.poll() is None:  # noqa: ASYNC110 - our own child, as the backend's pidfd
            await anyio.sleep(0.01)
    tail = await pump.finish()
    return len(tail)


def measure(variant: str, mb: int, work: Path) -> tuple[float, float]:
    """(worker CPU seconds, wall seconds) for one run printing `mb` MB."""
    stream = "stream_output" in variant
    pump_type = BeforePump if variant == "file, stream_output (before)" else OutputPump
    sink = (lambda lines: None) if variant == "pipe, forward_output" else None
    argv = [sys.executable, "-c", WRITER, str(mb)]
    devnull = open(os.devnull, "w")  # noqa: SIM115 - swapped in for sys.stdout below
    saved, sys.stdout = sys.stdout, devnull
    try:
        started_cpu, started = cpu(), time.monotonic()
        if variant.startswith("file"):
            path = work / f"{uuid.uuid4()}.log"
            with path.open("ab") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            anyio.run(follow, OutputFile(path), process, stream, sink, pump_type)
            path.unlink()
        else:
            output = open_run_output(work, uuid.uuid4(), 1 << 20)
            assert output.writer is not None
            process = subprocess.Popen(argv, stdout=output.writer, stderr=subprocess.STDOUT)
            output.close_writer()
            anyio.run(follow, output.source, process, stream, sink, pump_type)
            output.remove()
        return cpu() - started_cpu, time.monotonic() - started
    finally:
        sys.stdout = saved
        devnull.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="MB each run prints (200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; best kept")
    args = parser.parse_args()
    variants = ["pipe, stream_output", "pipe, drain only", "pipe, forward_output",
                "file, stream_output (before)", "file, stream_output (before, today's pump)"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            results = [measure(variant, args.mb, Path(tmp)) for _ in range(args.repeat)]
            cpu_s, wall = min(results)
            rows.append((variant, cpu_s, wall))
    print(f"{args.mb} MB per run, best of {args.repeat}; Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    print("| output path | worker CPU ms per MB | worker CPU s | wall s | MB/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, cpu_s, wall in rows:
        print(f"| {variant} | {1000 * cpu_s / args.mb:.2f} | {cpu_s:.2f} | {wall:.2f} | "
              f"{args.mb / wall:.0f} |")


if __name__ == "__main__":
    main()
