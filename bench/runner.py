"""One workload under one worker: set-up, the measurement, clean-up."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.analysis import analyse, kube_figures
from bench.environment import (
    BENCH_ENV,
    BUSYBOX_IMAGE,
    ENGINE,
    HELLO_FLOW_DIR,
    PREFECT,
    REPO,
    clean_env,
    say,
    utcnow,
)
from bench.kube import KubeSetup
from bench.machine import ProcessTable, reap_strays, remove_containers, wait_quiet
from bench.profiler import Profiler
from bench.sampler import children, helpers_tree_cpu, pss_mb, read_proc, warm_helpers
from bench.server import BenchAPI, start_server
from bench.worker import WorkerProcess
from bench.workloads import Workload
from harness.postgres import Postgres
from harness.prefect_server import PrefectServer


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="flowhand-bench-"))
        self.postgres: Postgres | None = None
        self.server: PrefectServer | None = None
        self.api: BenchAPI | None = None
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
        self.server = start_server(self.home, self.postgres.url)
        self.api = BenchAPI(self.server.api_url)
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
        if w.backend == "kubernetes":
            return {}  # the namespace and image: bench/kube.py (no engine runs on kwok)
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
        kube, extra_env = None, {}
        if w.backend == "kubernetes":
            kube = KubeSetup(kind, self.home, self.server.api_url)
            extra_env = kube.start()
        if w.job == "flow":
            deployment = self.deploy_flow(pool)
        else:
            variables = {**self.job_variables(w), **(kube.job_variables() if kube else {})}
            deployment = api.create_deployment(pool, variables, name=f"dep-{pool}",
                                               flow_name=f"bench-{w.name}")
        worker = WorkerProcess(kind, pool, w.backend, self.server.api_url, self.home, w.warm,
                               extra_env)
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
            kube_seen = kube.close() if kube else None
        result.update(self.analyse(w, worker, deployment, window_start, window_end, release))
        if kube_seen is not None:
            result["completer_errors"] = kube_seen["completer_errors"]
            result["reopened_after_completed"] = kube_seen["reopened_after_completed"]
            result.update(kube_figures(self.api.histories(run_ids), kube_seen["job_seen"],
                                       kube_seen["kube_requests"], len(run_ids)))
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

    def wait_final(self, api: BenchAPI, deployment: str, w: Workload, worker: WorkerProcess,
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
        assert self.api
        runs = self.api.flow_runs(deployment)
        histories = self.api.histories([r["id"] for r in runs])
        return analyse(w, worker, runs, histories, window_start, window_end, release)
