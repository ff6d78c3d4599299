"""Test helpers: a real Prefect server in its own tool environment, and a small sync API client.

Prefect is never imported here: it lives in a separate virtual environment (`.tools/prefect`, or
`$FLOWHAND_PREFECT_ENV`), exactly as flowhand's runtime never imports it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PREFECT_ENV = Path(os.environ.get("FLOWHAND_PREFECT_ENV", REPO / ".tools" / "prefect"))
#: The Prefect versions flowhand is tested against, each in a tool environment of its own
#: (scripts/bootstrap.sh installs them; an environment variable points elsewhere).
PREFECT_ENVS = {
    "3.8.8": PREFECT_ENV,
    "3.9.1": Path(os.environ.get("FLOWHAND_PREFECT_391_ENV",
                                 REPO / ".tools" / "prefect-3.9.1")),
}
ENGINE = Path(__file__).resolve().parent / "engine.py"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_command(*args: str) -> str:
    """A job command running the stand-in engine with this interpreter."""
    return " ".join([sys.executable, str(ENGINE), *args])


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: subprocess.Popen[bytes] | None = None

    env_dir: Path = PREFECT_ENV

    @property
    def bin_dir(self) -> Path:
        return self.env_dir / "bin"

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server with Prefect's tools."""
        # The test suite's own FLOWHAND_PREFECT_* variables would read as flowhand settings.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOWHAND_PREFECT")}
        return {
            **inherited,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @classmethod
    def start(cls, home: Path, port: int | None = None,
              extra_env: dict[str, str] | None = None, env_dir: Path = PREFECT_ENV) -> PrefectServer:
        prefect = env_dir / "bin" / "prefect"
        if not prefect.exists():
            raise RuntimeError(
                f"{prefect} not found: run scripts/test (it installs Prefect there)"
            )
        port = port or free_port()
        server = cls(api_url=f"http://127.0.0.1:{port}/api", home=home, env_dir=env_dir)
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
        with (home / "server.log").open("wb") as log:
            server.process = subprocess.Popen(
                [str(prefect), "server", "start"], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        server.stop()
        raise RuntimeError("prefect server did not become healthy in 120 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


class API:
    """Synchronous test-side access to the Prefect API (set-up and read-back)."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.Client(base_url=api_url + "/", timeout=30)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        for attempt in range(30):
            response = self.http.request(method, path.lstrip("/"), **kw)
            if response.status_code != 503:  # SQLite "database is locked" under load
                break
            time.sleep(0.1 * (attempt + 1))
        response.raise_for_status()
        return response.json() if response.content else None

    def create_pool(self, name: str | None = None, type: str = "process",
                    template: dict[str, Any] | None = None) -> str:
        name = name or f"pool-{uuid.uuid4().hex[:8]}"
        body: dict[str, Any] = {"name": name, "type": type}
        if template is not None:
            body["base_job_template"] = template
        self.call("POST", "/work_pools/", json=body)
        return name

    def create_deployment(self, pool: str, job_variables: dict[str, Any] | None = None,
                          name: str | None = None, flow_name: str = "test-flow",
                          **extra: Any) -> str:
        flow = self.call("POST", "/flows/", json={"name": flow_name})
        body = {
            "name": name or f"dep-{uuid.uuid4().hex[:8]}",
            "flow_id": flow["id"],
            "work_pool_name": pool,
            "job_variables": job_variables or {},
            **extra,
        }
        return str(self.call("POST", "/deployments/", json=body)["id"])

    def create_run(self, deployment_id: str, job_variables: dict[str, Any] | None = None,
                   **extra: Any) -> str:
        body: dict[str, Any] = {"job_variables": job_variables or {}, **extra}
        run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)
        return str(run["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/flow_runs/{run_id}")
        return result

    def state(self, run_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self.flow_run(run_id)["state"]
        return state

    def history(self, run_id: str) -> list[dict[str, Any]]:
        states: list[dict[str, Any]] = self.call(
            "GET", "/flow_run_states/", params={"flow_run_id": run_id}
        )
        return states

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = self.call(
            "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}
        )
        return logs

    def wait_final(self, run_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state["type"] in FINAL:
                return state
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} not final after {timeout} s: {self.state(run_id)}")


def skip_or_fail(reason: str) -> None:
    """Skip locally when a prerequisite cannot be made; in CI (CI=true) that is a failure."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def deploy_hello(server: PrefectServer, pool: str, name: str = "hello",
                 env: dict[str, str] | None = None) -> str:
    """Deploy the real flow tests/flows/hello.py with Prefect's own `from_source().deploy()`
    (in Prefect's tool environment, with `env` or the server's); its deployment id."""
    script = (
        "from prefect import flow\n"
        f"d = flow.from_source(source={str(REPO / 'tests' / 'flows')!r}, "
        f"entrypoint='hello.py:hello').deploy(name={name!r}, work_pool_name={pool!r}, "
        "build=False, push=False, print_next_steps=False, parameters={'name': 'flowhand'})\n"
        "print(d)\n"
    )
    out = subprocess.run([str(server.bin_dir / "python"), "-c", script],
                         env=env or server.env(), capture_output=True, text=True, timeout=180)
    if out.returncode:
        raise RuntimeError(f"deploy failed: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]
