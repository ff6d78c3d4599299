"""Running the real `flowhand` console script (the one `pip install` puts on PATH)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

Result = subprocess.CompletedProcess[str]

#: The console script of the environment the tests run in.
FLOWHAND = str(Path(sys.executable).parent / "flowhand")


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no Prefect or flowhand settings of the caller, HOME at `home` (so
    no user's Prefect profile), JSON logs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "FLOWHAND_"))}
    env.update({"HOME": str(home), "FLOWHAND_LOGGING__FORMAT": "json"})
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str], cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOWHAND, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, at most three lines on stderr, no traceback; the configuration error line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.splitlines()
    assert len(lines) <= 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error = [line for line in lines if line.startswith("flowhand: configuration error:")]
    assert len(error) == 1, result.stderr
    for needle in needles:
        assert needle in error[0], (needle, error[0])
    return error[0]


class Running:
    """A `flowhand` process whose stderr is read line by line in a thread."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path | None = None,
                 **popen: Any) -> None:
        """`popen`: more Popen arguments (`stdout=subprocess.DEVNULL` for a worker that
        streams a lot of run output, `umask`)."""
        options: dict[str, Any] = {"stdout": subprocess.PIPE, **popen}
        self.proc = subprocess.Popen([FLOWHAND, *args], env=env, cwd=cwd,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **options)
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> float:
        """Wait for a stderr line containing `needle`; seconds since the process started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.lines)):
                return time.monotonic() - self.started
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not seen in {timeout} s: {self.stderr[-2000:]}")

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30, signum: int = signal.SIGTERM) -> int:
        """Send `signum` and wait; the exit status (the process is killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            self._reader.join(5)
            assert self.proc.stderr is not None
            if self.proc.stdout is not None:
                self.out = self.proc.stdout.read()
                self.proc.stdout.close()
            self.proc.stderr.close()
        return self.proc.returncode

    def stdout(self) -> str:
        """What the process printed on stdout (after `stop`)."""
        return self.out
