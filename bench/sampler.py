"""Reading a worker process from /proc: a sampler thread for its CPU time, RSS and PSS, and
the processes around it (its children, flowhand's warm helpers)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.25


@dataclass
class Sample:
    wall: float
    cpu_s: float
    rss_mb: float
    #: The worker's CPU plus that of its children it has reaped (the engines it ran).
    tree_cpu_s: float = 0.0


def read_proc(pid: int) -> tuple[float, float, float, float] | None:
    """(CPU seconds, RSS MB, peak RSS MB, tree CPU seconds) of one process, its threads
    included; the tree CPU adds its reaped children's (utime + stime + cutime + cstime)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    tree = cpu + (int(fields[13]) + int(fields[14])) / CLK_TCK  # + cutime + cstime
    rss = hwm = 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return cpu, rss, hwm, tree


def children(pid: int) -> list[int]:
    """The child processes of `pid` (of any of its threads)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


def warm_helpers(pid: int) -> list[int]:
    """flowhand's warm helpers: its children running engine_helper.py (a forked run has the
    same command line, but its parent is a helper, not flowhand)."""
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"engine_helper.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size: each shared page divided among the processes that map it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def helpers_tree_cpu(helpers: list[int]) -> float:
    """The CPU of flowhand's live warm helpers and of the runs they forked and reaped (a helper
    outlives the burst, so flowhand has not reaped it: its CPU is not in flowhand's cutime)."""
    total = 0.0
    for helper in helpers:
        read = read_proc(helper)
        if read is not None:
            total += read[3]
    return total


class Sampler(threading.Thread):
    #: PSS is read every this many samples (smaps_rollup walks the page tables: not free).
    PSS_EVERY = 4

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[Sample] = []
        self.peak_rss_mb = 0.0
        #: Worker plus warm helpers, and the whole tree (runs included): peaks of the sums.
        self.peak_pss_mb = 0.0
        self.peak_tree_pss_mb = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0

    def sample(self) -> Sample | None:
        read = read_proc(self.pid)
        if read is None:
            return None
        cpu, rss, hwm, tree = read
        helpers = warm_helpers(self.pid)
        sample = Sample(time.time(), cpu, rss, tree + helpers_tree_cpu(helpers))
        self._count += 1
        if self._count % self.PSS_EVERY == 1:
            own = pss_mb(self.pid) + sum(pss_mb(h) for h in helpers)
            whole = pss_mb(self.pid) + sum(pss_mb(d) for d in descendants(self.pid))
        else:
            own = whole = 0.0
        with self._lock:
            self.samples.append(sample)
            self.peak_rss_mb = max(self.peak_rss_mb, rss, hwm)
            self.peak_pss_mb = max(self.peak_pss_mb, own)
            self.peak_tree_pss_mb = max(self.peak_tree_pss_mb, whole)
        return sample

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def cpu_at(self, wall: float, tree: bool = False) -> float | None:
        """CPU seconds at a wall-clock time, interpolated between samples (`tree`: with the
        reaped children's)."""
        with self._lock:
            samples = list(self.samples)
        if not samples:
            return None

        def value(s: Sample) -> float:
            return s.tree_cpu_s if tree else s.cpu_s

        if wall <= samples[0].wall:
            return value(samples[0])
        for a, b in zip(samples, samples[1:], strict=False):
            if a.wall <= wall <= b.wall:
                span = b.wall - a.wall
                return value(a) + (value(b) - value(a)) * ((wall - a.wall) / span if span else 0)
        return value(samples[-1])
