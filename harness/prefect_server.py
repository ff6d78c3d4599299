"""A real Prefect server on a free loopback port, started from a tool environment of its own.

Prefect is never imported here: it lives in a separate virtual environment (`.tools/prefect`, or
`$FLOWHAND_PREFECT_ENV`), exactly as flowhand's runtime never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PREFECT_ENV = Path(os.environ.get("FLOWHAND_PREFECT_ENV", REPO / ".tools" / "prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to a process group, SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: subprocess.Popen[bytes] | None = None

    env_dir: Path = PREFECT_ENV
    #: The environment Prefect's processes inherit (None: ours, see `env`).
    inherit: Mapping[str, str] | None = None

    @property
    def bin_dir(self) -> Path:
        return self.env_dir / "bin"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server with Prefect's tools."""
        if self.inherit is not None:
            inherited = dict(self.inherit)
        else:
            # The test suite's own FLOWHAND_PREFECT_* variables would read as flowhand settings.
            inherited = {k: v for k, v in os.environ.items()
                         if not k.startswith("FLOWHAND_PREFECT")}
        return {
            **inherited,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @classmethod
    def start(cls, home: Path, port: int | None = None,
              extra_env: dict[str, str] | None = None, env_dir: Path = PREFECT_ENV,
              inherit: Mapping[str, str] | None = None,
              ready_timeout: float = 120) -> PrefectServer:
        """`prefect server start` with PREFECT_HOME `home` (its log there too), healthy."""
        prefect = env_dir / "bin" / "prefect"
        if not prefect.exists():
            raise RuntimeError(
                f"{prefect} not found: run scripts/test (it installs Prefect there)"
            )
        port = port or free_port()
        server = cls(api_url=f"http://127.0.0.1:{port}/api", home=home, env_dir=env_dir,
                     inherit=inherit)
        env = {
            **server.env(),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_ENABLED": "false",
            # Late-run marking and friends only add load here.
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            **(extra_env or {}),
        }
        env.pop("PREFECT_API_URL")
        with server.log_path.open("wb") as log:
            server.process = subprocess.Popen(
                [str(prefect), "server", "start"], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=home,
            )
        server.wait_healthy(ready_timeout)
        return server

    def wait_healthy(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not become healthy in {timeout:g} s")

    def stop(self, grace: float = 20) -> None:
        if self.process and self.process.poll() is None:
            stop_group(self.process, grace)
