"""The machine under the benchmark: what it is, how busy it is, and what others use of it;
cleaning up what a workload leaves behind."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.environment import BENCH_ENV, FLOWHAND, REPO
from bench.sampler import CLK_TCK
from harness.postgres import pg_bin


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    mem_kb = first("/proc/meminfo", "MemTotal").split()[0]
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    docker = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb.isdigit() else None,
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "docker_engine": docker or None,
    }


def versions() -> dict[str, Any]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  cwd=REPO).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    py = str(BENCH_ENV / "bin" / "python")
    pkg = out(py, "-c", "import importlib.metadata as m; print(m.version('prefect'), "
                        "m.version('prefect-docker'))").split()
    dirty = bool(out("git", "status", "--porcelain", "--", "src", "pyproject.toml"))
    return {
        "flowhand": out(str(FLOWHAND), "--version").replace("flowhand ", ""),
        "flowhand_commit": out("git", "rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
        "prefect": pkg[0] if pkg else None,
        "prefect_docker": pkg[1] if len(pkg) > 1 else None,
        "postgresql": out(str(pg_bin() / "postgres"), "--version").rsplit(" ", 1)[-1],
    }


def reap_strays(api_url: str) -> int:
    """Kill what is left of runs of this bench (processes carrying our API URL)."""
    needle = f"PREFECT_API_URL={api_url}".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def remove_containers(pool: str) -> int:
    ids = subprocess.run(["docker", "ps", "-aq", "--filter",
                          f"label=io.prefect.work-pool-name={pool}"],
                         capture_output=True, text=True, timeout=120).stdout.split()
    for start in range(0, len(ids), 50):
        subprocess.run(["docker", "rm", "-f", *ids[start:start + 50]], capture_output=True,
                       timeout=300)
    return len(ids)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def machine_busy(interval: float = 2.0) -> float:
    """Fraction of all cores busy over `interval` seconds."""
    b0, t0 = cpu_times()
    time.sleep(interval)
    b1, t1 = cpu_times()
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(limit: float, threshold: float = 0.2) -> dict[str, Any]:
    """Wait (at most `limit` seconds) until the machine is mostly idle; say how busy it was.

    Others may share the machine (a test suite, another benchmark): their CPU time competes with
    the server, the worker and its runs, so a measurement starts on a quiet machine if it can.
    """
    deadline = time.monotonic() + limit
    waited = time.monotonic()
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(3.0)
    return {"busy_before": round(busy, 3), "waited_quiet_s": round(time.monotonic() - waited, 1),
            "loadavg_before": float(Path("/proc/loadavg").read_text().split()[0])}


class ProcessTable:
    """CPU ticks of every process, to tell how much CPU others used during a measurement."""

    SHARED = ("dockerd", "containerd", "containerd-shim", "docker-proxy", "kdamond.0")

    def __init__(self, ours: list[int]) -> None:
        self.ticks: dict[tuple[int, str], int] = {}
        self.names: dict[tuple[int, str], str] = {}
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat.rsplit(")", 1)[1].split()
            key = (int(entry.name), f[19])  # pid and start time: one process
            self.ticks[key] = int(f[11]) + int(f[12])
            self.names[key] = name
            parents[int(entry.name)] = int(f[1])
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        self.ours: set[int] = set()
        todo = [p for p in ours if p in parents]
        while todo:
            pid = todo.pop()
            if pid not in self.ours:
                self.ours.add(pid)
                todo += children.get(pid, [])

    def foreign_cpu_since(self, before: ProcessTable) -> tuple[float, list[str]]:
        """CPU seconds used by processes that are not ours (at least: the ones still alive)."""
        total = 0
        by_name: dict[str, int] = {}
        for key, ticks in self.ticks.items():
            pid = key[0]
            name = self.names[key]
            if pid in self.ours or pid in before.ours or name.startswith(self.SHARED):
                continue
            delta = ticks - before.ticks.get(key, 0)
            if delta > 0:
                total += delta
                by_name[name] = by_name.get(name, 0) + delta
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
        return total / CLK_TCK, [f"{n} {t / CLK_TCK:.1f}s" for n, t in top if t >= CLK_TCK]
