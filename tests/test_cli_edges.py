"""Rough edges a new operator meets, each through the real `flowhand` console script: Prefect's
CLI options, signals during start-up, one-shot failures, what the logs and metrics say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import console
from tests.prefect_env import API, PrefectServer, engine_command, free_port


def _env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return console.base_env(tmp_path, PREFECT_API_URL=url,
                            FLOWHAND_STATE_DIR=str(tmp_path / "state"), **extra)


def _profiles(home: Path, **profiles: dict[str, str]) -> None:
    (home / ".prefect").mkdir(exist_ok=True)
    text = 'active = "default"\n[profiles.default]\n'
    for name, settings in profiles.items():
        text += f"[profiles.{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in settings.items())
    (home / ".prefect" / "profiles.toml").write_text(text)


def _config(*args: str, env: dict[str, str]) -> dict[str, object]:
    result = console.run(*args, env=env)
    assert result.returncode == 0, result.stderr
    return {row["key"]: row["value"] for row in json.loads(result.stdout)}


def test_profile_selects_the_prefect_profile_as_prefect_does(tmp_path: Path) -> None:
    """`--profile` (before or after the command) reads that profile, whose settings win over
    PREFECT_* variables as with `prefect --profile`; an unknown profile is one line (exit 2)."""
    _profiles(tmp_path, prod={"PREFECT_API_URL": "https://prod.invalid/api",
                              "PREFECT_API_SSL_CERT_FILE": "/etc/ca.pem"})
    env = _env(tmp_path, "http://127.0.0.1:9/api")
    for args in (["--profile", "prod", "config", "--json"],
                 ["config", "--profile", "prod", "--json"]):
        rows = _config(*args, env=env)
        assert rows["api.url"] == "https://prod.invalid/api", args
        assert rows["api.ssl_cert_file"] == "/etc/ca.pem"
    assert _config("config", "--json", env=env)["api.url"] == "http://127.0.0.1:9/api"
    result = console.run("--profile", "nope", "start", "--pool", "p", env=env)
    console.assert_one_line_error(result, "'nope'", "no such profile")


def test_prompt_flags_and_empty_work_queue_are_accepted(tmp_path: Path) -> None:
    """`--prompt`, `--no-prompt` (before or after the command) and `--empty-work-queue` are
    accepted, as `prefect worker start` takes them, and change nothing."""
    env = _env(tmp_path, "http://127.0.0.1:9/api")
    for args in (["--no-prompt", "start", "--pool", "p", "--show-config"],
                 ["start", "--prompt", "--pool", "p", "--empty-work-queue", "--show-config"],
                 ["start", "--no-prompt", "--pool", "p", "--show-config"]):
        result = console.run(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert "pool" in result.stdout


def test_config_prints_every_backends_keys_with_their_source(tmp_path: Path) -> None:
    """`flowhand config` and `start --show-config` print the [subprocess] and [docker] keys, so
    warm starts can be checked."""
    env = _env(tmp_path, "http://127.0.0.1:9/api", FLOWHAND_SUBPROCESS__WARM_START="true")
    rows = _config("config", "--json", env=env)
    assert rows["subprocess.warm_start"] is True
    assert "docker.kill_grace_seconds" in rows
    shown = console.run("start", "--pool", "p", "--show-config", env=env)
    line = next(x for x in shown.stdout.splitlines() if x.startswith("subprocess.warm_start"))
    assert "true" in line and "FLOWHAND_SUBPROCESS__WARM_START" in line


def _wait_for_handler(pid: int, signum: int, timeout: float = 10) -> None:
    """Until the process catches `signum` (its SigCgt mask in /proc says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1],
                     16)
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.002)
    raise AssertionError("the signal handler was never installed")


def test_a_signal_during_the_first_moments_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM or SIGINT while flowhand is still importing (well before 0.2 s) is a clean stop:
    exit 0, no traceback."""
    env = _env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = console.Running("start", "--pool", "p", env=env)
        # Python catches SIGINT from its own start; SIGTERM only once flowhand does (both are
        # installed together, SIGINT a few microseconds later).
        _wait_for_handler(proc.proc.pid, signal.SIGTERM)
        time.sleep(0.01)
        sent_after = time.monotonic() - proc.started
        code = proc.stop(timeout=20, signum=signum)
        assert code == 0, (signum, sent_after, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert "stopped during start-up" in proc.stderr or "worker.signal" in proc.stderr


def test_run_once_against_an_unreachable_api_exits_1_within_10_seconds(tmp_path: Path) -> None:
    """`--run-once` with nothing listening at the API URL exits 1 within 10 s, saying why."""
    env = _env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    started = time.monotonic()
    result = console.run("start", "--pool", "p", "--run-once", env=env, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-2000:]
    assert took < 10, f"took {took:.1f} s"
    assert "worker.api_unreachable" in result.stderr


def test_missing_pool_is_said_before_anything_else(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """A pool that must exist and does not: one line (exit 2) and no `worker.starting` before it."""
    env = _env(tmp_path, prefect_server.api_url)
    result = console.run("start", "--pool", "no-such-pool", "--no-create-pool-if-not-found",
                         env=env)
    console.assert_one_line_error(result, "'no-such-pool' not found")
    assert "worker.starting" not in result.stderr


def test_started_line_names_the_command_that_runs(
    prefect_server: PrefectServer, api: API, tmp_path: Path
) -> None:
    """A deployment with Prefect's default command: `flow_run.started` names the engine that
    actually starts (`<python> -m prefect.engine`), not `prefect flow-run execute`."""
    pool = api.create_pool()
    run_id = api.create_run(api.create_deployment(pool))
    env = _env(tmp_path, prefect_server.api_url,
               PATH=f"{prefect_server.bin_dir}:/usr/bin:/bin")
    result = console.run("start", "--pool", pool, "--run-once", env=env, timeout=180)
    started = [e for e in console.json_lines(result.stderr) if e.get("event") == "flow_run.started"]
    assert started and started[0]["flow_run_id"] == run_id, result.stderr[-3000:]
    assert started[0]["command"].endswith("-m prefect.engine"), started[0]
    assert started[0]["command"].startswith(str(prefect_server.bin_dir.parent))


def test_free_slots_of_an_idle_unlimited_worker_is_200(
    prefect_server: PrefectServer, api: API, tmp_path: Path
) -> None:
    """`flowhand_free_slots` reads 200 on an idle worker without a limit, as its help says."""
    pool = api.create_pool()
    port = free_port()
    env = _env(tmp_path, prefect_server.api_url, FLOWHAND_HTTP__ENABLED="true",
               FLOWHAND_HTTP__PORT=str(port))
    proc = console.Running("start", "--pool", pool, env=env)
    try:
        proc.wait_for("worker.started", 60)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        proc.stop()
    line = next(x for x in metrics.splitlines() if x.startswith("flowhand_free_slots{"))
    assert float(line.split()[-1]) == 200.0, line


def test_readme_synopsis_has_every_flag_and_command(tmp_path: Path) -> None:
    """Every long option of `flowhand start --help` (and the top level's, and the `config`
    command) appears in the README's synopsis block."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    synopsis = readme.split("flowhand [--profile NAME]", 1)[1].split("```", 1)[0]
    env = console.base_env(tmp_path)
    for args in (["start", "--help"], ["--help"], ["config", "--help"]):
        text = console.run(*args, env=env).stdout
        flags = {word.strip("[],|`().") for word in text.split() if word.startswith(("--", "[--"))}
        flags = {f.split("=")[0] for f in flags if f.startswith("--") and f != "--help"}
        missing = sorted(f for f in flags if f not in synopsis)
        assert not missing, (args, missing)
    assert "flowhand config" in synopsis


def test_a_restarted_worker_removes_the_temporary_directory_of_a_run_it_reattached(
    prefect_server: PrefectServer, api: API, tmp_path: Path
) -> None:
    """kill -9 of the worker while a run (no working_dir) is in flight, then a restart: the run
    completes under the new worker, and its temporary working directory is gone afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pool = api.create_pool()
    run_id = api.create_run(api.create_deployment(pool, job_variables={
        "command": engine_command("--sleep", "4"), "stream_output": False}))
    env = _env(tmp_path, prefect_server.api_url, TMPDIR=str(tmp),
               FLOWHAND_POLL_INTERVAL_SECONDS="0.3")
    first = console.Running("start", "--pool", pool, "--name", "w", env=env)
    try:
        first.wait_for("flow_run.started", 60)
        assert [p.name for p in tmp.iterdir() if p.name.startswith("flowhand-")]
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.stop()
    second = console.Running("start", "--pool", pool, "--name", "w", env=env)
    try:
        assert api.wait_final(run_id, 120)["type"] == "COMPLETED"
        second.wait_for("flow_run.reattached", 30)
        deadline = time.monotonic() + 10
        while any(tmp.glob("flowhand-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        second.stop()
    assert not list(tmp.glob("flowhand-*")), list(tmp.iterdir())


REPO = Path(__file__).resolve().parent.parent


def test_demo_installs_only_the_prefect_it_uses() -> None:
    """scripts/demo asks bootstrap for flowhand's environment and Prefect 3.8.8, not 3.9.1."""
    steps = [line.split("#")[0].strip() for line in (REPO / "scripts" / "demo").read_text()
             .splitlines() if line.startswith("ensure_")]
    script = (f"source {REPO / 'scripts' / 'bootstrap.sh'}\n"
              'ensure_tool_env() { echo "INSTALL $*"; }\n'
              "ensure_flowhand_env() { :; }\n" + "\n".join(steps))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWHAND_PREFECT")}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    installs = [line for line in out.splitlines() if line.startswith("INSTALL")]
    assert installs and all("prefect==3.8.8" in line for line in installs), out
    assert "3.9.1" not in out


@pytest.mark.slow
def test_demo_completes_and_leaves_no_temporary_directory(tmp_path: Path) -> None:
    """scripts/demo.py runs its three flows to COMPLETED and removes its temporary directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLOWHAND_"))}
    env.update(TMPDIR=str(tmp_path), HOME=str(tmp_path),
               FLOWHAND_PREFECT_ENV=os.environ.get("FLOWHAND_PREFECT_ENV",
                                                   str(REPO / ".tools" / "prefect")))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "all runs COMPLETED" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("flowhand-")], \
        list(tmp_path.iterdir())
