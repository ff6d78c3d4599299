"""The tables of a benchmark run (Markdown), and the documents that show the latest one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.workloads import WORKER_LABEL, WORKERS, Workload

MARKER_START = "<!-- bench:latest:start -->"
MARKER_END = "<!-- bench:latest:end -->"


def costs_table(costs: list[dict[str, Any]]) -> str:
    lines = ["| request | sent by | server CPU ms | latency ms |", "|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['request']} | {c['sent_by']} | {c['server_cpu_ms']:.1f} | "
                     f"{c['latency_ms']:.1f} |")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pair(a: Any, b: Any) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def note(w: Workload, r: dict[str, Any]) -> str:
    parts = []
    if r.get("status") not in (None, "ok"):
        parts.append(str(r["status"]))
    if w.mode == "cold" and r.get("first_claim_s") is not None:
        parts.append(f"first claim {r['first_claim_s']:.2f} s after start")
    if r.get("repeats"):
        each = ", ".join(fmt(x.get(w.key)) for x in r["repeats"])
        parts.append(f"median of {len(r['repeats'])} ({each})")
    if w.job == "flow" and r.get("tree_cpu_per_run_s") is not None:
        parts.append(f"worker + engines {r['tree_cpu_s']:.1f} CPU s, "
                     f"{r['tree_cpu_per_run_s']:.2f} s per run")
    if r.get("warm_starts"):
        ws = r["warm_starts"]
        parts.append(f"{ws['forked']} runs forked warm, {ws['cold']} cold"
                     + (f" ({'; '.join(ws['cold_reasons'])})" if ws["cold"] else ""))
    if w.job == "flow" and r.get("peak_pss_mb"):
        helpers = (f" with {r['helpers']} warm helper{'s' if r['helpers'] > 1 else ''} "
                   f"({r['helpers_idle_pss_mb']:.0f} MB idle)" if r.get("helpers") else "")
        parts.append(f"PSS peak: worker{helpers} {r['peak_pss_mb']:.0f} MB, whole tree "
                     f"{r['tree_peak_pss_mb']:.0f} MB")
    if r.get("kube_requests_per_run") is not None:
        parts.append(f"claim to Job created p50 {fmt(r.get('job_created_p50_s'))} s; "
                     f"{r['kube_requests']} kube-apiserver requests "
                     f"({r['kube_requests_per_run']:.2f} per run)")
        if r.get("reopened_after_completed"):
            parts.append(f"{r['reopened_after_completed']} COMPLETED runs set back to PENDING "
                         "by the worker's late reports (completed again)")
    if w.sleep:
        parts.append(f"{r.get('max_in_flight', 0)} in flight at most")
    if r.get("in_flight_cpu_pct") is not None:
        parts.append(f"{r['in_flight_cpu_pct']:.2f} % CPU while ≥{r['in_flight_threshold']} in "
                     f"flight ({r['in_flight_window_s']:.0f} s)")
    foreign = r.get("machine", {}).get("foreign_cpu_s")
    window = r.get("window_s") or 0
    if foreign and window and foreign / window > 0.1:
        parts.append(f"others used {foreign:.0f} CPU s meanwhile")
    bad = {k: v for k, v in r.get("final", {}).items() if k != "COMPLETED"}
    if bad:
        parts.append("not completed: " + ", ".join(f"{v} {k}" for k, v in bad.items()))
    return "; ".join(parts)


def table(results: dict[str, Any], specs: dict[str, Workload]) -> str:
    head = ("| workload | worker | runs done | makespan s | claim p50 / p99 s | "
            "start p50 / p99 s | worker CPU s | worker peak RSS MB | notes |")
    lines = [head, "|" + "---|" * 9]
    for name, entry in results.items():
        w = specs[name]
        for kind in WORKERS:
            r = entry.get(kind)
            if r is None:
                continue
            label = WORKER_LABEL[kind] + (" --warm-start" if w.warm and kind == "flowhand"
                                          else "")
            lines.append(
                f"| {w.title} | {label} | {r.get('completed', 0)}/{entry['runs']} | "
                f"{fmt(r.get('makespan_s'))} | "
                f"{pair(r.get('claim_p50_s'), r.get('claim_p99_s'))} | "
                f"{pair(r.get('start_p50_s'), r.get('start_p99_s'))} | {fmt(r.get('cpu_s'))} | "
                f"{fmt(r.get('peak_rss_mb'), 0)} | {note(w, r)} |")
        q = entry.get("ratios")
        if q:
            extra = f"first claim {q['first_claim_s']:.2f}×" if "first_claim_s" in q else ""
            if "tree_cpu_per_run_s" in q and w.job == "flow":
                extra = f"worker + engines CPU per run {q['tree_cpu_per_run_s']:.2f}×"
                if "peak_pss_mb" in q and "tree_peak_pss_mb" in q:
                    extra += (f"; PSS peak: worker{' + helpers' if w.warm else ''} "
                              f"{q['peak_pss_mb']:.2f}×, whole tree {q['tree_peak_pss_mb']:.2f}×")
            lines.append(
                f"| {w.title} | **flowhand / Prefect** | | **{fmt(q.get('makespan_s'))}×** | "
                f"{pair(q.get('claim_p50_s'), q.get('claim_p99_s'))}× | "
                f"{pair(q.get('start_p50_s'), q.get('start_p99_s'))}× | "
                f"**{fmt(q.get('cpu_s'), 3)}×** | **{fmt(q.get('peak_rss_mb'), 3)}×** | {extra} |")
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | target | measured | met |", "|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['workload']} | {row['target']} | {fmt(row['measured'])} | {met} |")
    return "\n".join(lines)


def scale_table(results: dict[str, Any]) -> str:
    entry = results.get("scale")
    if not entry:
        return ""
    lines = ["| minute | " + " | ".join(f"{WORKER_LABEL[k]} CPU % / RSS MB" for k in WORKERS
                                          if k in entry) + " |",
             "|---|" + "---|" * sum(1 for k in WORKERS if k in entry)]
    minutes = max((len(entry[k].get("per_minute", [])) for k in WORKERS if k in entry), default=0)
    for m in range(minutes):
        cells = []
        for k in WORKERS:
            if k not in entry:
                continue
            pm = entry[k].get("per_minute", [])
            cells.append(f"{fmt(pm[m]['cpu_pct'])} / {fmt(pm[m]['rss_mb_max'], 0)}"
                         if m < len(pm) else "–")
        lines.append(f"| {m + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any], specs: dict[str, Workload], png: str) -> str:
    m = doc["machine"]
    v = doc["versions"]
    out = [
        f"Measured {doc['date']} on {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['os']}, Docker {m['docker_engine']}; "
        f"Prefect {v['prefect']} (prefect-docker {v['prefect_docker']}) on PostgreSQL "
        f"{v['postgresql']}, flowhand {v['flowhand']} ({v['flowhand_commit']}). "
        f"Command: `{doc['command']}` ({doc['duration_s'] / 60:.1f} min).",
        "",
        f"![benchmark chart]({png})",
        "",
        table(doc["results"], specs),
        "",
        "Latencies are measured from each run's scheduled time (`expected_start_time`): claim = "
        "PENDING, start = RUNNING; makespan = first scheduled time to last final state (cold "
        "start: worker start to last final state). Worker CPU is the worker process's own CPU "
        "time (user + system, not its children) from just before the runs were created until "
        "all were final (cold start: from the worker's start); peak RSS is its high-water mark. "
        "For the real flow, the notes add the CPU of the whole tree (the worker and the engines "
        "it ran, read once it has reaped them; with --warm-start also the helpers and the runs "
        "they forked), the figure to compare for default commands, and memory as proportional "
        "set size (PSS, shared pages counted once), read once a second: the worker (with its "
        "warm helpers) and its whole tree, runs included.",
        "",
        targets_table(doc["targets"]),
    ]
    st = scale_table(doc["results"])
    if st:
        out += ["", "Scale, per minute since the worker started:", "", st]
    if doc.get("server_request_costs"):
        out += ["", "What each request costs the Prefect server (CPU time of its process, one "
                "request at a time; the server answers on one core). Per run, Prefect's worker "
                "sends the deployment and flow reads, the claim, a second PENDING (`Submitting`), "
                "labels and the infrastructure pid, plus events; flowhand sends the claim, the "
                "history read, labels, the pid and a final read of the run, and reads a "
                "deployment and a flow once per poll; the engine sends RUNNING and COMPLETED.",
                "", costs_table(doc["server_request_costs"])]
    return "\n".join(out) + "\n"


def update_markers(path: Path, text: str) -> bool:
    """Replace the block between the bench markers of a Markdown file, when it has them."""
    try:
        content = path.read_text()
    except OSError:
        return False
    # Markers on lines of their own, so that a mention of them in the text is left alone.
    pattern = re.compile("^" + re.escape(MARKER_START) + r"[ \t]*\n.*?^" + re.escape(MARKER_END)
                         + "[ \t]*$", re.S | re.M)
    if len(pattern.findall(content)) != 1:
        return False
    path.write_text(pattern.sub(lambda _: f"{MARKER_START}\n{text}{MARKER_END}", content))
    return True
