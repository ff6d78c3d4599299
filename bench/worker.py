"""One worker process under measurement: Prefect's `prefect worker start` or flowhand."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.environment import BENCH_ENV, FLOWHAND, PREFECT, REPO, clean_env, say
from bench.sampler import Sampler
from bench.server import BenchAPI


class WorkerProcess:
    def __init__(self, kind: str, pool: str, backend: str, api_url: str, home: Path,
                 warm: bool = False, extra_env: dict[str, str] | None = None) -> None:
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
            self.argv = [str(FLOWHAND), "start", "--pool", pool,
                         "--warm-start" if warm else "--no-warm-start"]
        self.env = {**env, **(extra_env or {})}
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

    def wait_ready(self, api: BenchAPI, timeout: float = 120) -> float:
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
        forked = 0
        reasons: dict[str, int] = {}
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
