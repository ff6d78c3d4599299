"""Running the real `flowhand` console script (the one `pip install` puts on PATH)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def popen(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([FLOWHAND, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


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


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> tuple[str, float]:
    """Read stderr until a line contains `needle`; (the lines so far, seconds it took)."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    started = time.monotonic()
    seen = ""
    while time.monotonic() - started < timeout:
        chunk = proc.stderr.read()
        if chunk:
            seen += chunk
            if needle in seen:
                return seen, time.monotonic() - started
        elif proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not seen in {timeout} s: {seen[-2000:]}")


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """SIGTERM, then wait; (exit status, rest of stderr)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err
