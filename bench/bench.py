"""flowhand side by side with `prefect worker start`: one machine, one run, one table.

Run it through `bench/run`, which installs what this needs first (see docs/bench.md):

    bench/run [--quick] [--only burst,wide,containers,cold,steady,flow,flow-warm,flow-idle,scale]
              [--size NAME=N[xS]]

What happens, once per run: a private PostgreSQL cluster and a Prefect 3.8.8 server backed by it
start on free loopback ports. Then, for each workload, first Prefect's worker and then flowhand
each get a fresh work pool (created with Prefect's own default base job template for its type)
and an identical deployment; the bench creates the workload's runs, waits until every run is
final, stops the worker with SIGTERM and reads every run's state history from the API. A sampler
thread reads the worker process's CPU time and RSS from /proc (the worker itself, not its
children) every 0.25 s, and once a second the proportional set size (PSS: shared pages counted
once) of the worker with flowhand's warm helpers, and of its whole tree, runs included.

This file imports nothing from Prefect or flowhand: it drives both through their command lines
and the REST API, with httpx, and draws the chart with matplotlib.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.postgres_env import Postgres, pg_bin  # noqa: E402 - needs the repository on the path

BENCH_ENV = Path(os.environ.get("FLOWHAND_BENCH_ENV", REPO / ".tools" / "bench-prefect"))
PREFECT = BENCH_ENV / "bin" / "prefect"
FLOWHAND = REPO / ".venv" / "bin" / "flowhand"
ENGINE = REPO / "tests" / "engine.py"
HELLO_FLOW_DIR = REPO / "examples"
BUSYBOX_IMAGE = "flowhand-test/busybox:1"
RESULTS = REPO / "bench" / "results"
FINAL = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKERS = ("prefect", "flowhand")
WORKER_LABEL = {"prefect": "prefect worker", "flowhand": "flowhand"}
SAMPLE_INTERVAL = 0.25
PY_SPY = BENCH_ENV / "bin" / "py-spy"
MARKER_START = "<!-- bench:latest:start -->"
MARKER_END = "<!-- bench:latest:end -->"

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def clean_env() -> dict[str, str]:
    """Our environment without any Prefect or flowhand settings of the caller."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "FLOWHAND_", "PYTHON"))}


# -- workloads -----------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    runs: int
    sleep: float = 0.0
    backend: str = "process"          # process | docker
    mode: str = "due_now"             # due_now | cold | steady
    job: str = "engine"               # engine | flow
    timeout: float = 300.0            # for all runs to be final, per worker
    prefect_timeout: float | None = None  # Prefect's worker's, when it differs
    workers: tuple[str, ...] = WORKERS
    measures: str = ""
    repeats: int = 1                  # alternating workers; the median repetition is reported
    key: str = "makespan_s"           # ... by this figure
    spacing: float = 1.0              # steady: seconds between two runs' scheduled times
    warm: bool = False                # flowhand with --warm-start (Prefect's worker has none)


def workloads(quick: bool) -> dict[str, Workload]:
    q = quick
    return {w.name: w for w in [
        Workload("burst", "burst", 20 if q else 100, timeout=300,
                 measures="runs due now, trivial command, process backend"),
        Workload("wide", "wide", 20 if q else 200, sleep=10 if q else 30, timeout=400,
                 measures="runs due now sleeping in flight together, process backend"),
        Workload("containers", "containers", 10 if q else 50, backend="docker", timeout=400,
                 measures="runs due now, trivial command, Docker backend, local image"),
        Workload("cold", "cold start", 5 if q else 10, mode="cold", timeout=300, repeats=3,
                 key="first_claim_s",
                 measures="worker started with runs already due: time to first claim"),
        Workload("steady", "steady", 15 if q else 60, mode="steady", timeout=300,
                 measures="runs scheduled one per second ahead; start lateness"),
        Workload("flow", "real flow", 4 if q else 20, job="flow", timeout=600,
                 measures="a real Prefect flow (examples/hello_flow.py), default command"),
        Workload("flow-warm", "real flow, warm", 4 if q else 20, job="flow", warm=True,
                 timeout=600, measures="the same burst; flowhand with --warm-start (each run "
                 "forked by a helper that imported Prefect), Prefect's worker as it is"),
        # Far enough apart that each run starts on an idle machine (a cold run of this flow
        # costs some 3.5 CPU s): start latency with nothing else to wait for.
        Workload("flow-idle", "real flow, warm, one by one", 4 if q else 10, job="flow",
                 warm=True, mode="steady", spacing=8.0, timeout=600,
                 measures="the real flow due every 8 s (idle machine in between), flowhand "
                 "with --warm-start; start latency"),
        # Each run sleeps long enough for all to be in flight together: on 2 cores the server
        # next to the workers starts about 4 runs a second, so 1000 take some 250 s to start.
        # (The literal figure is 60 s: --size scale=1000x60.)
        Workload("scale", "scale", 100 if q else 1000, sleep=30 if q else 300,
                 timeout=300 if q else 900, prefect_timeout=300 if q else 600,
                 measures="runs sleeping in flight together; RSS and CPU per minute"),
    ]}


# -- machine ------------------------------------------------------------------------------------


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


# -- PostgreSQL and the Prefect server ---------------------------------------------------------


class PrefectServer:
    def __init__(self, home: Path, database_url: str) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.database_url = database_url
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = home / "server.log"

    def start(self) -> None:
        env = {
            **clean_env(),
            "PREFECT_HOME": str(self.home / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Marking runs Late only adds server load; it changes nothing a worker does.
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            # Keep connections to PostgreSQL open: with the default pool (5, overflow 10) the
            # server opens and closes a connection (a PostgreSQL process) per request under load.
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([str(PREFECT), "server", "start"], env=env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.home)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"prefect server exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise SystemExit("prefect server did not become healthy in 180 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            stop_group(self.process, 30)


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


class API:
    """Synchronous access to the Prefect API for set-up and read-back, retrying 5xx answers."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.Client(base_url=api_url + "/", timeout=60,
                                 limits=httpx.Limits(max_connections=16))

    def call(self, method: str, path: str, **kw: Any) -> Any:
        delay = 0.2
        for attempt in range(12):
            try:
                response = self.http.request(method, path.lstrip("/"), **kw)
            except httpx.TransportError:
                if attempt == 11:
                    raise
            else:
                if response.status_code < 500 or attempt == 11:
                    break
            time.sleep(delay)
            delay = min(delay * 2, 5)
        response.raise_for_status()
        return response.json() if response.content else None

    def create_pool(self, name: str, type_: str, template: dict[str, Any]) -> None:
        self.call("POST", "/work_pools/", json={"name": name, "type": type_,
                                               "base_job_template": template})

    def create_deployment(self, pool: str, flow_name: str, job_variables: dict[str, Any]) -> str:
        flow = self.call("POST", "/flows/", json={"name": flow_name})
        body = {"name": f"dep-{pool}", "flow_id": flow["id"], "work_pool_name": pool,
                "job_variables": job_variables}
        return str(self.call("POST", "/deployments/", json=body)["id"])

    def create_runs(self, deployment_id: str, times: list[datetime | None]) -> list[str]:
        """One run per entry: due at that time, or due now (the server's clock) for None."""
        def one(when: datetime | None) -> str:
            body: dict[str, Any] = {}
            if when is not None:
                body["state"] = {"type": "SCHEDULED",
                                 "state_details": {"scheduled_time": when.isoformat()}}
            run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
            return str(run["id"])

        with cf.ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, times))

    def pause_queue(self, pool: str, paused: bool) -> None:
        self.call("PATCH", f"/work_pools/{pool}/queues/default", json={"is_paused": paused})

    def count_final(self, deployment_id: str) -> int:
        return int(self.call("POST", "/flow_runs/count", json={"flow_runs": {
            "deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": FINAL}}}}))

    def workers(self, pool: str) -> list[dict[str, Any]]:
        return list(self.call("POST", f"/work_pools/{pool}/workers/filter", json={}))

    def flow_runs(self, deployment_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            page = self.call("POST", "/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 200, "offset": len(found)})
            found += page
            if len(page) < 200:
                return found

    def histories(self, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        def one(run_id: str) -> tuple[str, list[dict[str, Any]]]:
            return run_id, self.call("GET", "/flow_run_states/", params={"flow_run_id": run_id})

        with cf.ThreadPoolExecutor(8) as pool:
            return dict(pool.map(one, run_ids))


# -- the worker process and its sampler ---------------------------------------------------------


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
    total, inclusive, own = 0, {}, {}
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


class WorkerProcess:
    def __init__(self, kind: str, pool: str, backend: str, api_url: str, home: Path,
                 warm: bool = False) -> None:
        self.kind, self.pool, self.backend = kind, pool, backend
        self.log_path = home / f"{pool}.log"
        self.home = home
        env = {
            **clean_env(),
            "PREFECT_API_URL": api_url,
            # Both find Prefect on PATH: each runs its default engine command with that Prefect.
            "PATH": f"{BENCH_ENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(home / f"prefect-home-{pool}"),
        }
        if kind == "prefect":
            self.argv = [str(PREFECT), "worker", "start", "--pool", pool, "--type", backend,
                         "--install-policy", "never"]
        else:
            env["FLOWHAND_STATE_DIR"] = str(home / f"flowhand-state-{pool}")
            # This checkout's flowhand, also when .venv was installed from another tree.
            env["PYTHONPATH"] = str(REPO / "src")
            env["FLOWHAND_LOGGING__FORMAT"] = "json"
            # Warm starts are on by default: a cold workload says --no-warm-start.
            self.argv = [str(FLOWHAND), "start", "--pool", pool,
                         "--warm-start" if warm else "--no-warm-start"]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self.started_wall = 0.0
        self.tree_cpu_end: float | None = None

    def start(self) -> None:
        workdir = self.home / f"cwd-{self.pool}"
        workdir.mkdir(exist_ok=True)
        with self.log_path.open("wb") as log:
            self.started_wall = time.time()
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=workdir,
                                            start_new_session=True)
        self.sampler = Sampler(self.process.pid)
        self.sampler.sample()
        self.sampler.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, api: API, timeout: float = 120) -> float:
        """Seconds from start until the worker's first heartbeat reached the pool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.kind} worker exited at start-up:\n{self.tail()}")
            if api.workers(self.pool):
                return time.time() - self.started_wall
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} worker not ready after {timeout} s:\n{self.tail()}")

    def stop(self, grace: float = 60) -> int | None:
        """SIGTERM, then SIGKILL of its process group after `grace` seconds; the exit status."""
        if self.sampler:
            self.sampler.sample()
            self.sampler.stop()
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                say(f"  {self.kind} worker still running {grace:g} s after SIGTERM: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        return self.process.returncode

    def warm_starts(self) -> dict[str, Any]:
        """How flowhand started the runs (from its JSON log): forked by a warm helper, or cold
        with the reasons it gave."""
        forked, reasons = 0, {}
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "warm_start.forked":
                        forked += 1
                    elif event.get("event") == "warm_start.fallback":
                        reason = str(event.get("reason"))
                        reasons[reason] = reasons.get(reason, 0) + 1
        return {"forked": forked, "cold": sum(reasons.values()), "cold_reasons": reasons}

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


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
        total, by_name = 0, {}
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


# -- one workload under one worker --------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="flowhand-bench-"))
        self.postgres: Postgres | None = None
        self.server: PrefectServer | None = None
        self.api: API | None = None
        self.templates: dict[str, dict[str, Any]] = {}
        # flowhand's interpreter, which has no Prefect; -I -S below keep even its site-packages
        # out. (Not `python3` from PATH: that may be a pyenv shim, a shell script per start.)
        self.engine_python = str(REPO / ".venv" / "bin" / "python")
        self.current: WorkerProcess | None = None

    # set-up and tear-down

    def start(self) -> None:
        say("starting a private PostgreSQL cluster")
        self.postgres = Postgres()
        self.postgres.start()
        say(f"PostgreSQL on 127.0.0.1:{self.postgres.port}; starting the Prefect server")
        self.server = PrefectServer(self.home, self.postgres.url)
        self.server.start()
        self.api = API(self.server.api_url)
        say(f"Prefect server at {self.server.api_url}")
        for type_ in {w.backend for w in self.args.selected} | {"process"}:
            out = subprocess.run(
                [str(PREFECT), "work-pool", "get-default-base-job-template", "--type", type_],
                env={**clean_env(), "PREFECT_API_URL": self.server.api_url,
                     "PREFECT_HOME": str(self.home / "prefect-home")},
                capture_output=True, text=True, check=True, timeout=120)
            self.templates[type_] = json.loads(out.stdout)

    def close(self) -> None:
        if self.current is not None:
            self.current.stop(grace=10)
        if self.server is not None:
            reap_strays(self.server.api_url)
            self.server.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.args.keep:
            say(f"kept {self.home}")
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def process_table(self) -> ProcessTable:
        ours = [os.getpid()]
        if self.postgres and self.postgres.pid:
            ours.append(self.postgres.pid)
        return ProcessTable(ours)

    # the job each workload runs

    def job_variables(self, w: Workload) -> dict[str, Any]:
        sleep = ["--sleep", f"{w.sleep:g}"] if w.sleep else []
        if w.backend == "docker":
            return {"image": BUSYBOX_IMAGE, "image_pull_policy": "Never", "network_mode": "host",
                    "command": " ".join(["engine", *sleep])}
        # The stand-in engine with a Python that has no Prefect, isolated (-I) and without site
        # packages (-S): the same command line for both workers.
        return {"command": " ".join([self.engine_python, "-I", "-S", str(ENGINE), *sleep])}

    def deploy_flow(self, pool: str) -> str:
        """examples/hello_flow.py deployed with flow.from_source(...).deploy(...)."""
        assert self.server
        code = (
            "from prefect import flow\n"
            f"d = flow.from_source(source={str(HELLO_FLOW_DIR)!r}, "
            "entrypoint='hello_flow.py:hello')"
            f".deploy(name='hello-{pool}', work_pool_name={pool!r}, build=False, push=False, "
            "print_next_steps=False)\n"
            "print(d)\n"
        )
        out = subprocess.run(
            [str(BENCH_ENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
            timeout=180, cwd=self.home,
            env={**clean_env(), "PREFECT_API_URL": self.server.api_url,
                 "PREFECT_HOME": str(self.home / "prefect-home")})
        if out.returncode:
            raise RuntimeError(f"deploy failed: {out.stderr[-2000:]}")
        return out.stdout.strip().splitlines()[-1]

    # the measurement

    def run_one(self, w: Workload, kind: str) -> dict[str, Any]:
        assert self.api and self.server
        api = self.api
        pool = f"bench-{w.name}-{kind}-{uuid.uuid4().hex[:6]}"
        api.create_pool(pool, w.backend, self.templates[w.backend])
        if w.job == "flow":
            deployment = self.deploy_flow(pool)
        else:
            deployment = api.create_deployment(pool, f"bench-{w.name}", self.job_variables(w))
        worker = WorkerProcess(kind, pool, w.backend, self.server.api_url, self.home, w.warm)
        result: dict[str, Any] = {"worker": kind, "pool": pool}
        release: float | None = None
        profilers: dict[str, Profiler] = {}
        result["machine"] = wait_quiet(self.args.quiet_wait)
        if result["machine"]["busy_before"] > 0.2:
            say(f"  the machine is busy ({100 * result['machine']['busy_before']:.0f} % of all "
                "cores) with work that is not this benchmark's; measuring anyway")
        before = self.process_table()
        try:
            if w.mode == "cold":
                run_ids = api.create_runs(deployment, [None] * w.runs)
                time.sleep(1.0)
            self.current = worker
            worker.start()
            assert worker.sampler and worker.process
            if self.args.profile:
                stem = self.args.out / "profiles" / f"{w.name}-{kind}"
                profilers = {"worker": Profiler(worker.process.pid, Path(f"{stem}-worker.txt"))}
                if self.server.process:
                    profilers["server"] = Profiler(self.server.process.pid,
                                                   Path(f"{stem}-server.txt"))
            result["ready_s"] = round(worker.wait_ready(api), 3)
            if w.mode == "cold":
                window_start = worker.started_wall
            else:
                time.sleep(2.0)  # past start-up: its first poll and heartbeat are done
                window_start = time.time()
                worker.sampler.sample()
                if w.mode == "steady":
                    first = utcnow() + timedelta(seconds=5)
                    times: list[datetime | None] = [first + timedelta(seconds=i * w.spacing)
                                                    for i in range(w.runs)]
                    run_ids = api.create_runs(deployment, times)
                else:
                    # All due at one instant: created while the pool's queue is paused (no
                    # worker sees them), then released at once. Latencies count from the
                    # release (or the scheduled time, if later).
                    api.pause_queue(pool, True)
                    run_ids = api.create_runs(deployment, [None] * w.runs)
                    api.pause_queue(pool, False)
                    release = time.time()
            say(f"  {kind}: {len(run_ids)} runs created; waiting until all are final")
            timeout = w.prefect_timeout if kind == "prefect" and w.prefect_timeout else w.timeout
            done, status = self.wait_final(api, deployment, w, worker, timeout)
            window_end = time.time()
            # Runs are final before their processes have exited and been reaped: the tree CPU
            # is read once the worker has no children left (or after 60 s).
            worker.tree_cpu_end = self.tree_cpu_when_reaped(worker)
            helpers = warm_helpers(worker.process.pid)
            if helpers:
                # What the warm helpers keep between bursts, idle (PSS: shared pages once).
                result["helpers"] = len(helpers)
                result["helpers_idle_pss_mb"] = round(sum(pss_mb(h) for h in helpers), 1)
            if profilers:
                result["profile"] = {name: p.stop() for name, p in profilers.items()}
            worker.sampler.sample()
            foreign, top = self.process_table().foreign_cpu_since(before)
            result["machine"]["foreign_cpu_s"] = round(foreign, 1)
            result["machine"]["foreign_top"] = top
            result["status"] = status
            result["final_at_end"] = done
        finally:
            for profiler in profilers.values():  # stopped early (an error): still write it
                if profiler.process.poll() is None:
                    profiler.stop()
            result["exit_code"] = worker.stop()
            self.current = None
            if w.warm and kind == "flowhand":
                result["warm_starts"] = worker.warm_starts()
            if result.get("status") != "ok":
                result["log_tail"] = worker.tail(40)
            strays = reap_strays(self.server.api_url)
            if strays:
                result["strays_killed"] = strays
            if w.backend == "docker":
                result["containers_removed"] = remove_containers(pool)
        result.update(self.analyse(w, worker, deployment, window_start, window_end, release))
        with contextlib.suppress(httpx.HTTPError):
            api.call("DELETE", f"/work_pools/{pool}")
        return result

    def tree_cpu_when_reaped(self, worker: WorkerProcess, limit: float = 60) -> float | None:
        """The tree's CPU once no run is left (warm helpers stay: their CPU is added)."""
        assert worker.process
        pid = worker.process.pid
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            helpers = warm_helpers(pid)
            runs = [c for c in children(pid) if c not in helpers]
            runs += [c for h in helpers for c in children(h)]
            if not runs:
                break
            time.sleep(0.25)
        read = read_proc(pid)
        return read[3] + helpers_tree_cpu(warm_helpers(pid)) if read else None

    def wait_final(self, api: API, deployment: str, w: Workload, worker: WorkerProcess,
                   timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        done, last_report, dead_since = 0, time.monotonic(), None
        while time.monotonic() < deadline:
            done = api.count_final(deployment)
            if done >= w.runs:
                return done, "ok"
            if not worker.alive():
                # A dead worker finishes nothing more; leave its runs a moment to settle.
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > 30:
                    return done, f"worker exited ({worker.process and worker.process.returncode})"
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                rss = worker.sampler.samples[-1].rss_mb if worker.sampler and \
                    worker.sampler.samples else 0
                say(f"  {worker.kind}: {done}/{w.runs} final, worker RSS {rss:.0f} MB")
            time.sleep(1.0)
        return done, f"{w.runs - done} runs not final after {timeout:g} s"

    def analyse(self, w: Workload, worker: WorkerProcess, deployment: str, window_start: float,
                window_end: float, release: float | None) -> dict[str, Any]:
        assert self.api and worker.sampler
        runs = self.api.flow_runs(deployment)
        histories = self.api.histories([r["id"] for r in runs])
        claims, starts, ends, scheduled, finals = [], [], [], [], {}
        pending_at: list[float] = []
        per_run: list[list[float | None]] = []  # claim, start, end; seconds after scheduled
        running_spans: list[tuple[float, float]] = []
        for run in runs:
            due = parse_ts(run["expected_start_time"])
            if release is not None:
                due = max(due, release)
            scheduled.append(due)
            states = sorted(histories.get(run["id"], []), key=lambda s: s["timestamp"])
            pending = next((parse_ts(s["timestamp"]) for s in states if s["type"] == "PENDING"),
                           None)
            running = next((parse_ts(s["timestamp"]) for s in states if s["type"] == "RUNNING"),
                           None)
            final = next((s for s in reversed(states) if s["type"] in FINAL), None)
            if pending is not None:
                claims.append(pending - due)
                pending_at.append(pending)
            if running is not None:
                starts.append(running - due)
            per_run.append([rnd(pending - due) if pending is not None else None,
                            rnd(running - due) if running is not None else None,
                            rnd(parse_ts(final["timestamp"]) - due) if final else None])
            if final is not None:
                end = parse_ts(final["timestamp"])
                ends.append(end)
                finals[final["type"]] = finals.get(final["type"], 0) + 1
                if running is not None:
                    running_spans.append((running, end))
            elif running is not None:
                running_spans.append((running, window_end))
        first_claim = None
        if w.mode == "cold" and pending_at:
            first_claim = min(pending_at) - worker.started_wall
        origin = worker.started_wall if w.mode == "cold" else (min(scheduled) if scheduled
                                                                 else window_start)
        cpu_start = worker.sampler.cpu_at(window_start) or 0.0
        cpu_end = worker.sampler.cpu_at(window_end) or 0.0
        tree_start = worker.sampler.cpu_at(window_start, tree=True) or 0.0
        tree_end = worker.tree_cpu_end if worker.tree_cpu_end is not None else \
            worker.sampler.cpu_at(window_end, tree=True) or 0.0
        samples = worker.sampler.samples
        out: dict[str, Any] = {
            "runs": len(runs),
            "final": finals,
            "completed": finals.get("COMPLETED", 0),
            "makespan_s": round(max(ends) - origin, 3) if ends else None,
            "claim_p50_s": rnd(percentile(claims, 50)),
            "claim_p99_s": rnd(percentile(claims, 99)),
            "start_p50_s": rnd(percentile(starts, 50)),
            "start_p99_s": rnd(percentile(starts, 99)),
            "claimed": len(claims),
            "started": len(starts),
            "cpu_s": round(cpu_end - cpu_start, 3),
            "tree_cpu_s": round(tree_end - tree_start, 3),
            "tree_cpu_per_run_s": round((tree_end - tree_start) / len(runs), 3) if runs else None,
            "cpu_total_s": round(samples[-1].cpu_s, 3) if samples else None,
            "peak_rss_mb": round(worker.sampler.peak_rss_mb, 1),
            "peak_pss_mb": round(worker.sampler.peak_pss_mb, 1),
            "tree_peak_pss_mb": round(worker.sampler.peak_tree_pss_mb, 1),
            "max_in_flight": max_concurrent(running_spans),
            "window_s": round(window_end - window_start, 3),
        }
        if first_claim is not None:
            out["first_claim_s"] = round(first_claim, 3)
        if w.name == "scale":
            out.update(scale_profile(worker, running_spans, w.runs))
        # A one-per-second timeline of the worker (for the chart), relative to its start.
        timeline, next_t = [], 0.0
        for s in samples:
            t = s.wall - worker.started_wall
            if t >= next_t:
                timeline.append([round(t, 2), round(s.cpu_s, 3), round(s.rss_mb, 1)])
                next_t = t + 1.0
        out["timeline"] = timeline
        out["per_run"] = sorted(per_run, key=lambda r: (r[0] is None, r[0] or 0))
        return out


def request_costs(api: API, server: PrefectServer, template: dict[str, Any],
                  n: int = 40) -> list[dict[str, Any]]:
    """The server's CPU time per request of each kind a worker or its engine sends per run.

    One request at a time against the otherwise idle server, its process's CPU time read from
    /proc before and after: what one run costs the server, whichever worker sends it.
    """
    assert server.process
    pid = server.process.pid
    pool = f"bench-costs-{uuid.uuid4().hex[:6]}"
    api.create_pool(pool, "process", template)
    dep = api.create_deployment(pool, "bench-costs", {"command": "true"})
    api.pause_queue(pool, True)
    ids = api.create_runs(dep, [None] * n)
    flow_id = api.call("GET", f"/flow_runs/{ids[0]}")["flow_id"]
    http = api.http

    def state(i: int, type_: str) -> httpx.Response:
        return http.post(f"flow_runs/{ids[i]}/set_state", json={
            "state": {"type": type_, "state_details": {"transition_id": str(uuid.uuid4())}}})

    kinds: list[tuple[str, str, Any]] = [
        ("poll (get_scheduled_flow_runs, 40 due)", "both",
         lambda i: http.post(f"work_pools/{pool}/get_scheduled_flow_runs",
                             json={"limit": n})),
        ("read the deployment", "both", lambda i: http.get(f"deployments/{dep}")),
        ("read the flow", "both", lambda i: http.get(f"flows/{flow_id}")),
        ("propose PENDING (the claim)", "both", lambda i: state(i, "PENDING")),
        ("read the state history", "flowhand", lambda i: http.get(
            "flow_run_states/", params={"flow_run_id": ids[i]})),
        ("PATCH labels", "both", lambda i: http.patch(
            f"flow_runs/{ids[i]}/labels", json={"prefect.worker.name": "bench"})),
        ("PATCH infrastructure_pid", "both", lambda i: http.patch(
            f"flow_runs/{ids[i]}", json={"infrastructure_pid": f"host:{i}"})),
        ("propose RUNNING", "engine", lambda i: state(i, "RUNNING")),
        ("propose COMPLETED", "engine", lambda i: state(i, "COMPLETED")),
        ("read the flow run", "flowhand", lambda i: http.get(f"flow_runs/{ids[i]}")),
        ("heartbeat", "both", lambda i: http.post(
            f"work_pools/{pool}/workers/heartbeat",
            json={"name": "bench", "heartbeat_interval_seconds": 30})),
    ]
    out = []
    for name, who, call in kinds:
        before, started = read_proc(pid), time.perf_counter()
        for i in range(n):
            call(i).raise_for_status()
        after, wall = read_proc(pid), time.perf_counter() - started
        if before and after:
            out.append({"request": name, "sent_by": who,
                        "server_cpu_ms": round(1000 * (after[0] - before[0]) / n, 1),
                        "latency_ms": round(1000 * wall / n, 1)})
    with contextlib.suppress(httpx.HTTPError):
        api.call("DELETE", f"/work_pools/{pool}")
    return out


def costs_table(costs: list[dict[str, Any]]) -> str:
    lines = ["| request | sent by | server CPU ms | latency ms |", "|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['request']} | {c['sent_by']} | {c['server_cpu_ms']:.1f} | "
                     f"{c['latency_ms']:.1f} |")
    return "\n".join(lines)


def median_repetition(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The repetition with the median `key` (the only one when there is one), with the others
    summarised under "repeats"."""
    if len(runs) == 1:
        return runs[0]
    measured = sorted((r for r in runs if r.get(key) is not None), key=lambda r: r[key])
    chosen = dict(measured[(len(measured) - 1) // 2] if measured else runs[-1])
    chosen["repeats"] = [{k: r.get(k) for k in ("first_claim_s", "ready_s", "makespan_s",
                                                "claim_p50_s", "cpu_s", "peak_rss_mb", "status")}
                         for r in runs]
    return chosen


def rnd(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def max_concurrent(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans],
                    key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def scale_profile(worker: WorkerProcess, spans: list[tuple[float, float]],
                  runs: int) -> dict[str, Any]:
    """Per-minute RSS and CPU, and CPU while (almost) every run is in flight."""
    assert worker.sampler
    samples = worker.sampler.samples
    per_minute = []
    if samples:
        minute = 0
        while True:
            lo = worker.started_wall + 60 * minute
            hi = lo + 60
            inside = [s for s in samples if lo <= s.wall < hi]
            if not inside:
                break
            cpu_lo = worker.sampler.cpu_at(lo) or inside[0].cpu_s
            cpu_hi = worker.sampler.cpu_at(min(hi, samples[-1].wall)) or inside[-1].cpu_s
            span = min(hi, samples[-1].wall) - lo
            per_minute.append({
                "minute": minute + 1,
                "cpu_s": round(cpu_hi - cpu_lo, 3),
                "cpu_pct": round(100 * (cpu_hi - cpu_lo) / span, 2) if span > 0 else None,
                "rss_mb_max": round(max(s.rss_mb for s in inside), 1),
            })
            minute += 1
    # The stretch where at least 90 % of the runs are RUNNING at once.
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans],
                    key=lambda e: (e[0], e[1]))
    out: dict[str, Any] = {"per_minute": per_minute}
    # The longest stretch with at least 90 % of the runs RUNNING at once; when the runs never
    # were all in flight together, at least 90 % of the most that were.
    most = max_concurrent(spans)
    for threshold in (math.ceil(0.9 * runs), math.ceil(0.9 * most)):
        current, begin, window = 0, None, None
        for t, delta in events:
            current += delta
            if current >= threshold and begin is None:
                begin = t
            elif current < threshold and begin is not None:
                if window is None or t - begin > window[1] - window[0]:
                    window = (begin, t)
                begin = None
        if window and window[1] - window[0] > 1 and threshold > 0:
            a, b = window
            cpu = (worker.sampler.cpu_at(b) or 0) - (worker.sampler.cpu_at(a) or 0)
            rss = [s.rss_mb for s in samples if a <= s.wall <= b]
            out["in_flight_threshold"] = threshold
            out["in_flight_window_s"] = round(b - a, 1)
            out["in_flight_cpu_pct"] = round(100 * cpu / (b - a), 2)
            out["in_flight_rss_mb_max"] = round(max(rss), 1) if rss else None
            break
    return out


# -- report -------------------------------------------------------------------------------------


RATIO_KEYS = ["makespan_s", "claim_p50_s", "claim_p99_s", "start_p50_s", "start_p99_s", "cpu_s",
              "peak_rss_mb", "tree_cpu_per_run_s", "peak_pss_mb", "tree_peak_pss_mb"]


def ratios(prefect: dict[str, Any] | None, flowhand: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not prefect or not flowhand:
        return out
    for key in RATIO_KEYS + ["first_claim_s"]:
        a, b = prefect.get(key), flowhand.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and a > 0 and b >= 0:
            out[key] = round(b / a, 3)
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the issue, each with what this run measured."""
    rows: list[dict[str, Any]] = []

    def ratio(workload: str, key: str, limit: float, label: str) -> None:
        if workload not in results:
            return
        r = results[workload].get("ratios", {}).get(key)
        rows.append({"workload": workload, "target": f"{label} ≤ {limit:g}× Prefect's",
                     "measured": None if r is None else f"{r:.3f}×",
                     "met": None if r is None else r <= limit})

    ratio("burst", "makespan_s", 0.5, "makespan")
    ratio("burst", "cpu_s", 0.1, "worker CPU")
    ratio("burst", "peak_rss_mb", 0.25, "worker peak RSS")
    ratio("wide", "peak_rss_mb", 0.15, "worker peak RSS")
    ratio("wide", "cpu_s", 0.1, "worker CPU")
    ratio("containers", "makespan_s", 0.7, "makespan")
    ratio("containers", "cpu_s", 0.2, "worker CPU")
    ratio("cold", "first_claim_s", 0.2, "time to first claim")
    ratio("flow", "makespan_s", 0.8, "makespan")
    ratio("flow", "tree_cpu_per_run_s", 1.0, "CPU per run (worker + engines)")
    ratio("flow-warm", "makespan_s", 0.35, "makespan")
    ratio("flow-warm", "tree_cpu_per_run_s", 0.3, "CPU per run (worker + helpers + engines)")

    def under(workload: str, key: str, limit: float, label: str) -> None:
        """flowhand's own figure below a limit, in seconds."""
        value = results.get(workload, {}).get("flowhand", {}).get(key)
        if workload in results:
            rows.append({"workload": workload, "target": f"{label} < {limit:g} s",
                         "measured": None if value is None else f"{value:.3f} s",
                         "met": None if value is None else value < limit})

    under("flow-idle", "start_p50_s", 1.0, "start latency p50 (warm, idle machine)")
    under("steady", "start_p99_s", 1.0, "p99 start lateness (defaults)")
    scale = results.get("scale", {}).get("flowhand")
    if scale is not None:
        runs = results["scale"]["runs"]
        inflight = scale.get("max_in_flight", 0)
        rows.append({"workload": "scale", "target": f"{runs} runs in flight together",
                     "measured": f"{inflight} at once", "met": inflight >= runs})
        rss = scale.get("peak_rss_mb")
        rows.append({"workload": "scale", "target": "worker RSS < 150 MB",
                     "measured": f"{rss:.0f} MB peak", "met": rss is not None and rss < 150})
        cpu = scale.get("in_flight_cpu_pct")
        rows.append({"workload": "scale", "target": "worker CPU < 2 % of a core while they run",
                     "measured": None if cpu is None else f"{cpu:.2f} %",
                     "met": None if cpu is None else cpu < 2.0})
    return rows


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pair(a: Any, b: Any) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def note(w: Workload, r: dict[str, Any]) -> str:
    parts = []
    if r.get("status") not in (None, "ok"):
        parts.append(str(r["status"]))
    if w.mode == "cold" and r.get("first_claim_s") is not None:
        parts.append(f"first claim {r['first_claim_s']:.2f} s after start")
    if r.get("repeats"):
        each = ", ".join(fmt(x.get(w.key)) for x in r["repeats"])
        parts.append(f"median of {len(r['repeats'])} ({each})")
    if w.job == "flow" and r.get("tree_cpu_per_run_s") is not None:
        parts.append(f"worker + engines {r['tree_cpu_s']:.1f} CPU s, "
                     f"{r['tree_cpu_per_run_s']:.2f} s per run")
    if r.get("warm_starts"):
        ws = r["warm_starts"]
        parts.append(f"{ws['forked']} runs forked warm, {ws['cold']} cold"
                     + (f" ({'; '.join(ws['cold_reasons'])})" if ws["cold"] else ""))
    if w.job == "flow" and r.get("peak_pss_mb"):
        helpers = (f" with {r['helpers']} warm helper{'s' if r['helpers'] > 1 else ''} "
                   f"({r['helpers_idle_pss_mb']:.0f} MB idle)" if r.get("helpers") else "")
        parts.append(f"PSS peak: worker{helpers} {r['peak_pss_mb']:.0f} MB, whole tree "
                     f"{r['tree_peak_pss_mb']:.0f} MB")
    if w.sleep:
        parts.append(f"{r.get('max_in_flight', 0)} in flight at most")
    if r.get("in_flight_cpu_pct") is not None:
        parts.append(f"{r['in_flight_cpu_pct']:.2f} % CPU while ≥{r['in_flight_threshold']} in "
                     f"flight ({r['in_flight_window_s']:.0f} s)")
    foreign = r.get("machine", {}).get("foreign_cpu_s")
    window = r.get("window_s") or 0
    if foreign and window and foreign / window > 0.1:
        parts.append(f"others used {foreign:.0f} CPU s meanwhile")
    bad = {k: v for k, v in r.get("final", {}).items() if k != "COMPLETED"}
    if bad:
        parts.append("not completed: " + ", ".join(f"{v} {k}" for k, v in bad.items()))
    return "; ".join(parts)


def table(results: dict[str, Any], specs: dict[str, Workload]) -> str:
    head = ("| workload | worker | runs done | makespan s | claim p50 / p99 s | "
            "start p50 / p99 s | worker CPU s | worker peak RSS MB | notes |")
    lines = [head, "|" + "---|" * 9]
    for name, entry in results.items():
        w = specs[name]
        for kind in WORKERS:
            r = entry.get(kind)
            if r is None:
                continue
            label = WORKER_LABEL[kind] + (" --warm-start" if w.warm and kind == "flowhand"
                                          else "")
            lines.append(
                f"| {w.title} | {label} | {r.get('completed', 0)}/{entry['runs']} | "
                f"{fmt(r.get('makespan_s'))} | "
                f"{pair(r.get('claim_p50_s'), r.get('claim_p99_s'))} | "
                f"{pair(r.get('start_p50_s'), r.get('start_p99_s'))} | {fmt(r.get('cpu_s'))} | "
                f"{fmt(r.get('peak_rss_mb'), 0)} | {note(w, r)} |")
        q = entry.get("ratios")
        if q:
            extra = f"first claim {q['first_claim_s']:.2f}×" if "first_claim_s" in q else ""
            if "tree_cpu_per_run_s" in q and w.job == "flow":
                extra = f"worker + engines CPU per run {q['tree_cpu_per_run_s']:.2f}×"
                if "peak_pss_mb" in q and "tree_peak_pss_mb" in q:
                    extra += (f"; PSS peak: worker{' + helpers' if w.warm else ''} "
                              f"{q['peak_pss_mb']:.2f}×, whole tree {q['tree_peak_pss_mb']:.2f}×")
            lines.append(
                f"| {w.title} | **flowhand / Prefect** | | **{fmt(q.get('makespan_s'))}×** | "
                f"{pair(q.get('claim_p50_s'), q.get('claim_p99_s'))}× | "
                f"{pair(q.get('start_p50_s'), q.get('start_p99_s'))}× | "
                f"**{fmt(q.get('cpu_s'), 3)}×** | **{fmt(q.get('peak_rss_mb'), 3)}×** | {extra} |")
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | target | measured | met |", "|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['workload']} | {row['target']} | {fmt(row['measured'])} | {met} |")
    return "\n".join(lines)


def scale_table(results: dict[str, Any]) -> str:
    entry = results.get("scale")
    if not entry:
        return ""
    lines = ["| minute | " + " | ".join(f"{WORKER_LABEL[k]} CPU % / RSS MB" for k in WORKERS
                                          if k in entry) + " |",
             "|---|" + "---|" * sum(1 for k in WORKERS if k in entry)]
    minutes = max((len(entry[k].get("per_minute", [])) for k in WORKERS if k in entry), default=0)
    for m in range(minutes):
        cells = []
        for k in WORKERS:
            if k not in entry:
                continue
            pm = entry[k].get("per_minute", [])
            cells.append(f"{fmt(pm[m]['cpu_pct'])} / {fmt(pm[m]['rss_mb_max'], 0)}"
                         if m < len(pm) else "–")
        lines.append(f"| {m + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any], specs: dict[str, Workload], png: str) -> str:
    m = doc["machine"]
    v = doc["versions"]
    out = [
        f"Measured {doc['date']} on {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['os']}, Docker {m['docker_engine']}; "
        f"Prefect {v['prefect']} (prefect-docker {v['prefect_docker']}) on PostgreSQL "
        f"{v['postgresql']}, flowhand {v['flowhand']} ({v['flowhand_commit']}). "
        f"Command: `{doc['command']}` ({doc['duration_s'] / 60:.1f} min).",
        "",
        f"![benchmark chart]({png})",
        "",
        table(doc["results"], specs),
        "",
        "Latencies are measured from each run's scheduled time (`expected_start_time`): claim = "
        "PENDING, start = RUNNING; makespan = first scheduled time to last final state (cold "
        "start: worker start to last final state). Worker CPU is the worker process's own CPU "
        "time (user + system, not its children) from just before the runs were created until "
        "all were final (cold start: from the worker's start); peak RSS is its high-water mark. "
        "For the real flow, the notes add the CPU of the whole tree (the worker and the engines "
        "it ran, read once it has reaped them; with --warm-start also the helpers and the runs "
        "they forked), the figure to compare for default commands, and memory as proportional "
        "set size (PSS, shared pages counted once), read once a second: the worker (with its "
        "warm helpers) and its whole tree, runs included.",
        "",
        targets_table(doc["targets"]),
    ]
    st = scale_table(doc["results"])
    if st:
        out += ["", "Scale, per minute since the worker started:", "", st]
    if doc.get("server_request_costs"):
        out += ["", "What each request costs the Prefect server (CPU time of its process, one "
                "request at a time; the server answers on one core). Per run, Prefect's worker "
                "sends the deployment and flow reads, the claim, a second PENDING (`Submitting`), "
                "labels and the infrastructure pid, plus events; flowhand sends the claim, the "
                "history read, labels, the pid and a final read of the run, and reads a "
                "deployment and a flow once per poll; the engine sends RUNNING and COMPLETED.",
                "", costs_table(doc["server_request_costs"])]
    return "\n".join(out) + "\n"


def chart(doc: dict[str, Any], specs: dict[str, Workload], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    names = [n for n in results if all(k in results[n] for k in WORKERS)]
    colors = {"prefect": "#7a7a7a", "flowhand": "#1f77b4"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    panels = [("makespan_s", "makespan (s)"), ("cpu_s", "worker CPU (s)"),
              ("peak_rss_mb", "worker peak RSS (MB)"), ("start_p99_s", "p99 start latency (s)")]
    for ax, (key, label) in zip(axes.flat[:4], panels, strict=False):
        xs = range(len(names))
        for i, kind in enumerate(WORKERS):
            vals = [results[n][kind].get(key) or 0 for n in names]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in xs], vals, 0.38,
                          label=WORKER_LABEL[kind], color=colors[kind])
            if kind == "flowhand":
                for bar, n in zip(bars, names, strict=False):
                    r = results[n].get("ratios", {}).get(key)
                    if r is not None:
                        ax.annotate(f"{r:.2f}×", (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [specs[n].title for n in names], rotation=20, fontsize=9)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend()
    scale = results.get("scale", {})
    for ax, idx, label in ((axes.flat[4], 2, "scale: worker RSS (MB)"),
                           (axes.flat[5], 1, "scale: worker CPU (% of a core, 5 s)")):
        for kind in WORKERS:
            tl = scale.get(kind, {}).get("timeline")
            if not tl:
                continue
            if idx == 2:
                ax.plot([p[0] for p in tl], [p[2] for p in tl], label=WORKER_LABEL[kind],
                        color=colors[kind])
            else:
                xs2, ys2 = [], []
                for a, b in zip(tl[::5], tl[5::5], strict=False):
                    if b[0] > a[0]:
                        xs2.append(b[0])
                        ys2.append(100 * (b[1] - a[1]) / (b[0] - a[0]))
                ax.plot(xs2, ys2, label=WORKER_LABEL[kind], color=colors[kind])
        ax.set_title(label + (f", {scale.get('runs')} runs" if scale else ""))
        ax.set_xlabel("seconds since the worker started")
        ax.grid(alpha=0.3)
        if scale:
            ax.legend()
    m = doc["machine"]
    fig.suptitle(f"flowhand vs prefect worker — {doc['date']} — {m['nproc']} cores, "
                 f"{m['memory_gib']} GiB, {m['cpu_model']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_markers(path: Path, text: str) -> bool:
    """Replace the block between the bench markers of a Markdown file, when it has them."""
    try:
        content = path.read_text()
    except OSError:
        return False
    # Markers on lines of their own, so that a mention of them in the text is left alone.
    pattern = re.compile("^" + re.escape(MARKER_START) + r"[ \t]*\n.*?^" + re.escape(MARKER_END)
                         + "[ \t]*$", re.S | re.M)
    if len(pattern.findall(content)) != 1:
        return False
    path.write_text(pattern.sub(lambda _: f"{MARKER_START}\n{text}{MARKER_END}", content))
    return True


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="flowhand side by side with `prefect worker start` (see docs/bench.md).")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run (results in bench/results/quick.tmp)")
    parser.add_argument("--only", help="comma-separated workloads: burst, wide, containers, "
                        "cold, steady, flow, scale (default: all)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=RUNS[xSLEEP]",
                        help="override a workload's size, e.g. scale=500x60 or burst=50")
    parser.add_argument("--workers", default="prefect,flowhand",
                        help="which workers to run (default: prefect,flowhand)")
    parser.add_argument("--no-prefect-scale", action="store_true",
                        help="skip Prefect's worker in the scale workload (flowhand only)")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results, "
                        "or bench/results/quick.tmp with --quick)")
    parser.add_argument("--quiet-wait", type=float, default=120, metavar="SECONDS",
                        help="before each measurement, wait at most this long for the machine "
                        "to be mostly idle (default: 120)")
    parser.add_argument("--update-readme", action="store_true",
                        help="after a full run, also rewrite README.md's block between "
                        f"{MARKER_START} and {MARKER_END}")
    parser.add_argument("--no-costs", action="store_true",
                        help="skip the measurement of the server's CPU time per request")
    parser.add_argument("--profile", action="store_true",
                        help="record each worker and the server with py-spy while a workload "
                        "runs: collapsed stacks in <out>/profiles/, a summary in the JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (server and worker logs)")
    args = parser.parse_args(argv)
    specs = workloads(args.quick)
    chosen = [n.strip() for n in args.only.split(",")] if args.only else list(specs)
    unknown = [n for n in chosen if n not in specs]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    for item in args.size:
        m = re.fullmatch(r"(\w+)=(\d+)(?:x(\d+(?:\.\d+)?))?", item)
        if not m or m.group(1) not in specs:
            parser.error(f"bad --size {item!r}: NAME=RUNS or NAME=RUNSxSLEEP, e.g. scale=500x60")
        specs[m.group(1)].runs = int(m.group(2))
        if m.group(3):
            specs[m.group(1)].sleep = float(m.group(3))
    kinds = tuple(k.strip() for k in args.workers.split(","))
    if not set(kinds) <= set(WORKERS) or not kinds:
        parser.error("--workers: prefect, flowhand or both")
    for spec in specs.values():
        spec.workers = tuple(k for k in WORKERS if k in kinds)
    if args.no_prefect_scale:
        specs["scale"].workers = tuple(k for k in specs["scale"].workers if k != "prefect")
    args.specs = specs
    args.selected = [specs[n] for n in specs if n in chosen]
    args.out = args.out or (RESULTS / "quick.tmp" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    date = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    command = "bench/run" + ("" if argv is None and len(sys.argv) == 1 else
                             " " + " ".join(sys.argv[1:] if argv is None else argv))
    bench = Bench(args)
    results: dict[str, Any] = {}
    costs: list[dict[str, Any]] = []
    interrupted = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        bench.start()
        if not args.no_costs:
            say("server CPU per request, one request at a time")
            assert bench.api and bench.server
            costs = request_costs(bench.api, bench.server, bench.templates["process"])
        for w in args.selected:
            entry: dict[str, Any] = {"runs": w.runs, "sleep_s": w.sleep, "backend": w.backend,
                                     "measures": w.measures, "title": w.title}
            results[w.name] = entry
            reps: dict[str, list[dict[str, Any]]] = {kind: [] for kind in w.workers}
            for rep in range(w.repeats):
                for kind in w.workers:
                    n = f" (repetition {rep + 1} of {w.repeats})" if w.repeats > 1 else ""
                    say(f"{w.title}: {w.runs} runs under {WORKER_LABEL[kind]}{n}")
                    try:
                        r = bench.run_one(w, kind)
                    except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                        say(f"  {kind} failed: {exc}")
                        r = {"worker": kind, "status": f"failed: {exc}"[:2000]}
                    reps[kind].append(r)
                    say(f"  {kind}: {r.get('completed', 0)}/{w.runs} completed, makespan "
                        f"{fmt(r.get('makespan_s'))} s, claim p50 {fmt(r.get('claim_p50_s'))} s,"
                        f" CPU {fmt(r.get('cpu_s'))} s, peak RSS "
                        f"{fmt(r.get('peak_rss_mb'), 0)} MB"
                        + (f", first claim {r['first_claim_s']:.2f} s" if "first_claim_s" in r
                           else ""))
                    time.sleep(3)  # let the machine settle before the next worker
            for kind, runs in reps.items():
                entry[kind] = median_repetition(runs, w.key)
            entry["ratios"] = ratios(entry.get("prefect"), entry.get("flowhand"))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: cleaning up")
    finally:
        bench.close()
    if not results:
        return 130 if interrupted else 1
    doc = {
        "date": date,
        "command": command,
        "duration_s": round(time.monotonic() - started, 1),
        "interrupted": interrupted,
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "server": "prefect server start, PostgreSQL backend (fsync off), database pool 20 "
                      "(+20 overflow), UI and late-runs service off, otherwise defaults",
            "workers": "defaults: `prefect worker start --pool P --type T`, "
                       "`flowhand start --pool P`",
            "engine_command": bench.job_variables(Workload("x", "x", 1))["command"],
            "sample_interval_s": SAMPLE_INTERVAL,
        },
        "targets": targets(results),
        "results": results,
        "server_request_costs": costs,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    chart(doc, args.specs, out / "latest.png")
    png_rel = "latest.png"
    md = markdown(doc, args.specs, png_rel)
    (out / "latest.md").write_text(f"# Latest benchmark\n\n{md}")
    print()
    print(table(results, args.specs))
    print()
    print(targets_table(doc["targets"]))
    st = scale_table(results)
    if st:
        print()
        print(st)
    if costs:
        print()
        print(costs_table(costs))
    print(f"\nresults: {out / 'latest.json'}, {out / 'latest.png'}, {out / 'latest.md'} "
          f"({doc['duration_s'] / 60:.1f} min)")
    if out.resolve() == RESULTS.resolve() and not interrupted and not args.only:
        # A full run updates the documents that show the latest table, where they ask for it:
        # docs/bench.md always, README.md with --update-readme.
        docs = [(REPO / "docs" / "bench.md", "../bench/results/latest.png")]
        if args.update_readme:
            docs.append((REPO / "README.md", "bench/results/latest.png"))
        for doc_path, rel in docs:
            if update_markers(doc_path, markdown(doc, args.specs, rel)):
                say(f"updated {doc_path.relative_to(REPO)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
