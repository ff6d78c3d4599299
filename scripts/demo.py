"""End-to-end demo: a local Prefect server, a process pool, a real flow, runs under flowhand.

Run through scripts/demo, which installs what this needs first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.prefect_env import API, PrefectServer  # noqa: E402

POOL = "flowhand-demo"
NAMES = ["Ada", "Grace", "Linus"]


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="flowhand-demo-"))
    print(f"==> starting a Prefect server on loopback (PREFECT_HOME={home})", flush=True)
    server = PrefectServer.start(home)
    try:
        env = server.env()
        api = API(server.api_url)
        print(f"==> API at {server.api_url}; creating process pool {POOL!r}", flush=True)
        subprocess.run([str(server.bin_dir / "prefect"), "work-pool", "create", POOL,
                        "--type", "process"], env=env, check=True, capture_output=True)
        print("==> deploying examples/hello_flow.py with flow.from_source(...).deploy(...)",
              flush=True)
        deploy = (
            "from prefect import flow\n"
            f"d = flow.from_source(source={str(REPO / 'examples')!r}, "
            "entrypoint='hello_flow.py:hello')"
            f".deploy(name='hello', work_pool_name={POOL!r}, build=False, push=False, "
            "print_next_steps=False)\n"
            "print(d)\n"
        )
        out = subprocess.run([str(server.bin_dir / "python"), "-c", deploy], env=env, check=True,
                             capture_output=True, text=True)
        deployment_id = out.stdout.strip().splitlines()[-1]
        runs = {api.create_run(deployment_id, parameters={"name": n}): n for n in NAMES}
        print(f"==> created {len(runs)} flow runs; starting flowhand --run-once", flush=True)
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "flowhand"), "start", "--pool", POOL, "--run-once"],
            env={**env, "FLOWHAND_STATE_DIR": str(home / "flowhand")}, check=True,
        )
        print("\n==> final states", flush=True)
        ok = True
        for run_id, name in runs.items():
            run = api.flow_run(run_id)
            state = run["state"]
            logs = [log["message"] for log in api.logs(run_id) if "hello," in log["message"]]
            print(f"  {run['name']:<24} name={name:<6} {state['type']:<10} "
                  f"pid={run['infrastructure_pid']:<14} log: {logs[0] if logs else '-'}")
            ok &= state["type"] == "COMPLETED"
        print("==> all runs COMPLETED under flowhand" if ok else "==> some runs did not complete")
        return 0 if ok else 1
    finally:
        server.stop()
        # The server's database, the runs' files: nothing of the demo is left behind.
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
