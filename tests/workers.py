"""flowhand worker processes, the real console script (`python -m flowhand start`), on one pool:
each logs to a file of its own; start them, wait until they serve, read their JSON log events,
kill or stop them. The fleet tests (several workers racing) and the real-flow suite (one worker,
restarted) both drive their workers through `Workers`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.prefect_server import PrefectServer
from tests.waiting import wait_for


class Workers:
    """Worker processes on one pool; `env` is added to each one's environment."""

    def __init__(self, server: PrefectServer, pool: str, home: Path,
                 env: dict[str, str] | None = None) -> None:
        self.server = server
        self.pool = pool
        self.home = home
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.log_of: dict[str, Path] = {}

    def start(self, name: str, state_dir: Path, *args: str, api_url: str | None = None,
              log: str | None = None, output: bool = False,
              **env: str) -> subprocess.Popen[bytes]:
        """`flowhand start --pool POOL --name NAME ARGS` on `state_dir`; its log is stderr (and
        with `output`, stdout too: the runs' output), in `log` under home."""
        path = self.home / (log or f"{name}-{len(self.logs)}.log")
        self.logs.append(path)
        self.log_of[name] = path
        environ = {**self.server.env(), **self.env,
                   "PREFECT_API_URL": api_url or self.server.api_url,
                   "FLOWHAND_STATE_DIR": str(state_dir), **env}
        with path.open("wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "flowhand", "start", "--pool", self.pool, "--name", name,
                 *args], env=environ, stdout=out if output else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if output else out, start_new_session=True)
        return self.procs[name]

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, grace: float = 60) -> None:
        """SIGTERM to each, SIGKILL to its process group after `grace` seconds."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def wait_started(self, name: str, timeout: float = 120) -> None:
        def started() -> bool:
            if '"worker.started"' in self.log_of[name].read_text(errors="replace"):
                return True
            assert self.procs[name].poll() is None, self.log_of[name].read_text()[-2000:]
            return False

        wait_for(started, timeout, f"{name} to start")

    def events(self, event: str, worker: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The JSON log events of that name (and fields): of one worker, or of every worker
        started (a restarted one's logs included), in the order they were started."""
        found = []
        for log in [self.log_of[worker]] if worker else self.logs:
            for line in log.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event and all(record.get(k) == v
                                                        for k, v in match.items()):
                    found.append(record)
        return found

    def claimed_by(self, name: str) -> int:
        return self.log_of[name].read_text(errors="replace").count('"flow_run.claimed"')

    def tail(self, name: str, lines: int = 40) -> str:
        text = self.log_of[name].read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
