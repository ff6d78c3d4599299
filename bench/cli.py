"""`bench/run`'s command line: choose the workloads, run them, write and print the results."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.analysis import median_repetition, ratios, targets
from bench.chart import chart
from bench.costs import request_costs
from bench.environment import REPO, RESULTS, say, utcnow
from bench.machine import machine, versions
from bench.report import (
    MARKER_END,
    MARKER_START,
    costs_table,
    fmt,
    markdown,
    scale_table,
    table,
    targets_table,
    update_markers,
)
from bench.runner import Bench
from bench.sampler import SAMPLE_INTERVAL
from bench.workloads import WORKER_LABEL, WORKERS, Workload, workloads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="flowhand side by side with `prefect worker start` (see docs/bench.md).")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run (results in bench/results/quick.tmp)")
    parser.add_argument("--only", help="comma-separated workloads: burst, wide, containers, "
                        "cold, steady, flow, scale (default: all)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=RUNS[xSLEEP]",
                        help="override a workload's size, e.g. scale=500x60 or burst=50")
    parser.add_argument("--workers", default="prefect,flowhand",
                        help="which workers to run (default: prefect,flowhand)")
    parser.add_argument("--no-prefect-scale", action="store_true",
                        help="skip Prefect's worker in the scale workload (flowhand only)")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results, "
                        "or bench/results/quick.tmp with --quick)")
    parser.add_argument("--quiet-wait", type=float, default=120, metavar="SECONDS",
                        help="before each measurement, wait at most this long for the machine "
                        "to be mostly idle (default: 120)")
    parser.add_argument("--update-readme", action="store_true",
                        help="after a full run, also rewrite README.md's block between "
                        f"{MARKER_START} and {MARKER_END}")
    parser.add_argument("--no-costs", action="store_true",
                        help="skip the measurement of the server's CPU time per request")
    parser.add_argument("--profile", action="store_true",
                        help="record each worker and the server with py-spy while a workload "
                        "runs: collapsed stacks in <out>/profiles/, a summary in the JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (server and worker logs)")
    args = parser.parse_args(argv)
    specs = workloads(args.quick)
    chosen = [n.strip() for n in args.only.split(",")] if args.only else list(specs)
    unknown = [n for n in chosen if n not in specs]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    for item in args.size:
        m = re.fullmatch(r"(\w+)=(\d+)(?:x(\d+(?:\.\d+)?))?", item)
        if not m or m.group(1) not in specs:
            parser.error(f"bad --size {item!r}: NAME=RUNS or NAME=RUNSxSLEEP, e.g. scale=500x60")
        specs[m.group(1)].runs = int(m.group(2))
        if m.group(3):
            specs[m.group(1)].sleep = float(m.group(3))
    kinds = tuple(k.strip() for k in args.workers.split(","))
    if not set(kinds) <= set(WORKERS) or not kinds:
        parser.error("--workers: prefect, flowhand or both")
    for spec in specs.values():
        spec.workers = tuple(k for k in WORKERS if k in kinds)
    if args.no_prefect_scale:
        specs["scale"].workers = tuple(k for k in specs["scale"].workers if k != "prefect")
    args.specs = specs
    args.selected = [specs[n] for n in specs if n in chosen]
    args.out = args.out or (RESULTS / "quick.tmp" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    date = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    command = "bench/run" + ("" if argv is None and len(sys.argv) == 1 else
                             " " + " ".join(sys.argv[1:] if argv is None else argv))
    bench = Bench(args)
    results: dict[str, Any] = {}
    costs: list[dict[str, Any]] = []
    interrupted = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        bench.start()
        if not args.no_costs:
            say("server CPU per request, one request at a time")
            assert bench.api and bench.server
            costs = request_costs(bench.api, bench.server, bench.templates["process"])
        for w in args.selected:
            entry: dict[str, Any] = {"runs": w.runs, "sleep_s": w.sleep, "backend": w.backend,
                                     "measures": w.measures, "title": w.title}
            results[w.name] = entry
            reps: dict[str, list[dict[str, Any]]] = {kind: [] for kind in w.workers}
            for rep in range(w.repeats):
                for kind in w.workers:
                    n = f" (repetition {rep + 1} of {w.repeats})" if w.repeats > 1 else ""
                    say(f"{w.title}: {w.runs} runs under {WORKER_LABEL[kind]}{n}")
                    try:
                        r = bench.run_one(w, kind)
                    except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                        say(f"  {kind} failed: {exc}")
                        r = {"worker": kind, "status": f"failed: {exc}"[:2000]}
                    reps[kind].append(r)
                    say(f"  {kind}: {r.get('completed', 0)}/{w.runs} completed, makespan "
                        f"{fmt(r.get('makespan_s'))} s, claim p50 {fmt(r.get('claim_p50_s'))} s,"
                        f" CPU {fmt(r.get('cpu_s'))} s, peak RSS "
                        f"{fmt(r.get('peak_rss_mb'), 0)} MB"
                        + (f", first claim {r['first_claim_s']:.2f} s" if "first_claim_s" in r
                           else ""))
                    time.sleep(3)  # let the machine settle before the next worker
            for kind, runs in reps.items():
                entry[kind] = median_repetition(runs, w.key)
            entry["ratios"] = ratios(entry.get("prefect"), entry.get("flowhand"))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: cleaning up")
    finally:
        bench.close()
    if not results:
        return 130 if interrupted else 1
    doc: dict[str, Any] = {
        "date": date,
        "command": command,
        "duration_s": round(time.monotonic() - started, 1),
        "interrupted": interrupted,
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "server": "prefect server start, PostgreSQL backend (fsync off), database pool 20 "
                      "(+20 overflow), UI and late-runs service off, otherwise defaults",
            "workers": "defaults: `prefect worker start --pool P --type T`, "
                       "`flowhand start --pool P`",
            "engine_command": bench.job_variables(Workload("x", "x", 1))["command"],
            "sample_interval_s": SAMPLE_INTERVAL,
        },
        "targets": targets(results, args.specs),
        "results": results,
        "server_request_costs": costs,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    chart(doc, args.specs, out / "latest.png")
    png_rel = "latest.png"
    md = markdown(doc, args.specs, png_rel)
    (out / "latest.md").write_text(f"# Latest benchmark\n\n{md}")
    print()
    print(table(results, args.specs))
    print()
    print(targets_table(doc["targets"]))
    st = scale_table(results)
    if st:
        print()
        print(st)
    if costs:
        print()
        print(costs_table(costs))
    print(f"\nresults: {out / 'latest.json'}, {out / 'latest.png'}, {out / 'latest.md'} "
          f"({doc['duration_s'] / 60:.1f} min)")
    if out.resolve() == RESULTS.resolve() and not interrupted and not args.only:
        # A full run updates the documents that show the latest table, where they ask for it:
        # docs/bench.md always, README.md with --update-readme.
        docs = [(REPO / "docs" / "bench.md", "../bench/results/latest.png")]
        if args.update_readme:
            docs.append((REPO / "README.md", "bench/results/latest.png"))
        for doc_path, rel in docs:
            if update_markers(doc_path, markdown(doc, args.specs, rel)):
                say(f"updated {doc_path.relative_to(REPO)}")
    return 130 if interrupted else 0
