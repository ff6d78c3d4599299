"""`py-spy record` of a process while a workload runs (with --profile), and its summary."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path
from typing import Any

from bench.environment import PY_SPY


class Profiler:
    """`py-spy record` of one process while a workload runs (with --profile): where CPU goes.

    Writes collapsed stacks (one line per stack and its sample count; flamegraph.pl and
    speedscope read them) and keeps a summary: the frames that hold the most samples.
    """

    def __init__(self, pid: int, path: Path, rate: int = 50) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--output", str(path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(60)
        return summarise_profile(self.path)


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Total samples, and the frames present in the most samples (inclusive), from raw stacks."""
    total = 0
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
            own[frames[-1]] = own.get(frames[-1], 0) + n

    def best(table: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [[frame, round(100 * n / total, 1)] for frame, n in ranked]

    return {"file": path.name, "samples": total, "inclusive_pct": best(inclusive) if total else [],
            "self_pct": best(own) if total else []}
