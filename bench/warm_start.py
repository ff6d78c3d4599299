"""Real flow runs, cold against warm: makespan, start latency, CPU per run, memory.

    PYTHONPATH=src .venv/bin/python bench/warm_start.py [--runs 12] [--limit 4]

One Prefect server (SQLite, from .tools/prefect); the three-task flow `completes` of
tests/flows/fidelity.py deployed from source to a process pool; for each mode one `flowhand
start` (cold, then `--warm-start`) runs a burst of `--runs` runs created at once, `--limit` at a
time. This script makes itself a child subreaper, so helpers outliving flowhand are reaped here
and the CPU of the whole tree (flowhand, helpers, every engine) is in RUSAGE_CHILDREN. Memory is
the peak of the summed PSS of flowhand and its helpers (not the runs), sampled every
0.2 s, and the helpers' PSS once idle after the burst.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.prefect_env import API, PrefectServer  # noqa: E402

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
PR_SET_CHILD_SUBREAPER = 36


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def helpers() -> list[int]:
    """The helpers (forked runs carry the same command line, but a helper is their parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"engine_helper.py" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return [pid for pid in found if parent(pid) not in found]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap(pids: list[int]) -> None:
    """Wait for these processes, now children of this subreaper, then any other zombie."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                return
        except ChildProcessError:
            return


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def burst(mode: str, args: argparse.Namespace, server: PrefectServer, api: API, pool: str,
          deployment: str, home: Path) -> dict[str, Any]:
    flags = ["--warm-start"] if mode == "warm" else []
    config = home / "worker.toml"
    config.write_text(f"poll_interval_seconds = 0.5\nprefetch_seconds = 0\nlimit = {args.limit}\n")
    cpu_before = children_cpu()
    log = (home / f"worker-{mode}.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowhand", "start", "--pool", pool, "--config", str(config),
         "--name", f"bench-{mode}", *flags],
        env={**server.env(), "FLOWHAND_STATE_DIR": str(home / f"state-{mode}"),
             "FIDELITY_MARK_DIR": str(home)},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], pss_kb(worker.pid) + sum(pss_kb(p) for p in helpers()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(3)  # flowhand's own start-up is not part of the burst
    created = time.time()
    runs = [api.create_run(deployment) for _ in range(args.runs)]
    while True:
        states = [api.state(r)["type"] for r in runs]
        if all(s in FINAL for s in states):
            break
        if time.time() - created > 900:
            raise SystemExit(f"{mode}: not done after 900 s: {states}")
        time.sleep(0.5)
    done = time.time()
    stop.set()
    sampler.join()
    details = [api.flow_run(r) for r in runs]
    time.sleep(2)
    idle_helpers_kb = sum(pss_kb(p) for p in helpers())
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)
    left = helpers()
    for pid in left:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    reap(left)  # the helpers were reparented to this subreaper
    cpu = children_cpu() - cpu_before
    starts = sorted(ts(d["start_time"]) - created for d in details if d["start_time"])
    ends = [ts(d["end_time"]) for d in details if d["end_time"]]
    return {
        "mode": mode, "runs": args.runs, "limit": args.limit,
        "completed": states.count("COMPLETED"),
        "makespan_s": round(max(ends) - created, 2),
        "wall_to_all_final_s": round(done - created, 2),
        "start_latency_median_s": round(starts[len(starts) // 2], 2),
        "start_latency_max_s": round(starts[-1], 2),
        "cpu_per_run_s": round(cpu / args.runs, 2),
        "peak_pss_worker_and_helpers_mb": round(peak[0] / 1024, 1),
        "idle_helpers_pss_mb": round(idle_helpers_kb / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--home", default="/tmp/flowhand-warm-bench")
    args = parser.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    home = Path(args.home)
    subprocess.run(["rm", "-rf", str(home)], check=True)
    home.mkdir(parents=True)
    server = PrefectServer.start(home)
    api = API(server.api_url)
    try:
        pool = api.create_pool("warm-bench")
        script = ("from prefect import flow\nprint(flow.from_source(source="
                  f"{str(REPO / 'tests' / 'flows')!r}, entrypoint='fidelity.py:completes')"
                  f".deploy(name='bench', work_pool_name={pool!r}, build=False, push=False,"
                  " print_next_steps=False))")
        out = subprocess.run([str(server.bin_dir / "python"), "-c", script], env=server.env(),
                             capture_output=True, text=True, timeout=600, check=True)
        deployment = out.stdout.strip().splitlines()[-1]
        for mode in args.modes.split(","):
            print(json.dumps(burst(mode, args, server, api, pool, deployment, home)), flush=True)
    finally:
        api.http.close()
        server.stop()


if __name__ == "__main__":
    main()
