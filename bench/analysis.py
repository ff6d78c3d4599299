"""From run histories and samples to figures: latencies, CPU, memory, ratios and targets."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Protocol

from bench.sampler import Sampler
from bench.server import FINAL
from bench.workloads import Workload


class Measured(Protocol):
    """What the analysis reads of a worker process."""

    sampler: Sampler | None
    started_wall: float
    tree_cpu_end: float | None


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median_repetition(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The repetition with the median `key` (the only one when there is one), with the others
    summarised under "repeats"."""
    if len(runs) == 1:
        return runs[0]
    measured = sorted((r for r in runs if r.get(key) is not None), key=lambda r: r[key])
    chosen = dict(measured[(len(measured) - 1) // 2] if measured else runs[-1])
    chosen["repeats"] = [{k: r.get(k) for k in ("first_claim_s", "ready_s", "makespan_s",
                                                "claim_p50_s", "cpu_s", "peak_rss_mb", "status")}
                         for r in runs]
    return chosen


def rnd(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def max_concurrent(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans],
                    key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def scale_profile(worker: Measured, spans: list[tuple[float, float]],
                  runs: int) -> dict[str, Any]:
    """Per-minute RSS and CPU, and CPU while (almost) every run is in flight."""
    assert worker.sampler
    samples = worker.sampler.samples
    per_minute = []
    if samples:
        minute = 0
        while True:
            lo = worker.started_wall + 60 * minute
            hi = lo + 60
            inside = [s for s in samples if lo <= s.wall < hi]
            if not inside:
                break
            cpu_lo = worker.sampler.cpu_at(lo) or inside[0].cpu_s
            cpu_hi = worker.sampler.cpu_at(min(hi, samples[-1].wall)) or inside[-1].cpu_s
            span = min(hi, samples[-1].wall) - lo
            per_minute.append({
                "minute": minute + 1,
                "cpu_s": round(cpu_hi - cpu_lo, 3),
                "cpu_pct": round(100 * (cpu_hi - cpu_lo) / span, 2) if span > 0 else None,
                "rss_mb_max": round(max(s.rss_mb for s in inside), 1),
            })
            minute += 1
    # The stretch where at least 90 % of the runs are RUNNING at once.
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans],
                    key=lambda e: (e[0], e[1]))
    out: dict[str, Any] = {"per_minute": per_minute}
    # The longest stretch with at least 90 % of the runs RUNNING at once; when the runs never
    # were all in flight together, at least 90 % of the most that were.
    most = max_concurrent(spans)
    for threshold in (math.ceil(0.9 * runs), math.ceil(0.9 * most)):
        current, begin, window = 0, None, None
        for t, delta in events:
            current += delta
            if current >= threshold and begin is None:
                begin = t
            elif current < threshold and begin is not None:
                if window is None or t - begin > window[1] - window[0]:
                    window = (begin, t)
                begin = None
        if window and window[1] - window[0] > 1 and threshold > 0:
            a, b = window
            cpu = (worker.sampler.cpu_at(b) or 0) - (worker.sampler.cpu_at(a) or 0)
            rss = [s.rss_mb for s in samples if a <= s.wall <= b]
            out["in_flight_threshold"] = threshold
            out["in_flight_window_s"] = round(b - a, 1)
            out["in_flight_cpu_pct"] = round(100 * cpu / (b - a), 2)
            out["in_flight_rss_mb_max"] = round(max(rss), 1) if rss else None
            break
    return out


RATIO_KEYS = ["makespan_s", "claim_p50_s", "claim_p99_s", "start_p50_s", "start_p99_s", "cpu_s",
              "peak_rss_mb", "tree_cpu_per_run_s", "peak_pss_mb", "tree_peak_pss_mb",
              "kube_requests_per_run", "job_created_p50_s", "job_created_p99_s"]


def ratios(prefect: dict[str, Any] | None, flowhand: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not prefect or not flowhand:
        return out
    for key in RATIO_KEYS + ["first_claim_s"]:
        a, b = prefect.get(key), flowhand.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and a > 0 and b >= 0:
            out[key] = round(b / a, 3)
    return out


def targets(results: dict[str, Any], specs: dict[str, Workload]) -> list[dict[str, Any]]:
    """The targets of the issue, each with what this run measured."""
    rows: list[dict[str, Any]] = []

    def ratio(workload: str, key: str, limit: float, label: str) -> None:
        if workload not in results:
            return
        r = results[workload].get("ratios", {}).get(key)
        rows.append({"workload": workload, "target": f"{label} ≤ {limit:g}× Prefect's",
                     "measured": None if r is None else f"{r:.3f}×",
                     "met": None if r is None else r <= limit})

    for spec in specs.values():
        for key, (limit, label) in spec.ratio_targets.items():
            ratio(spec.name, key, limit, label)

    def under(workload: str, key: str, limit: float, label: str) -> None:
        """flowhand's own figure below a limit, in seconds."""
        value = results.get(workload, {}).get("flowhand", {}).get(key)
        if workload in results:
            rows.append({"workload": workload, "target": f"{label} < {limit:g} s",
                         "measured": None if value is None else f"{value:.3f} s",
                         "met": None if value is None else value < limit})

    under("flow-idle", "start_p50_s", 1.0, "start latency p50 (warm, idle machine)")
    under("steady", "start_p99_s", 1.0, "p99 start lateness (defaults)")
    scale = results.get("scale", {}).get("flowhand")
    if scale is not None:
        runs = results["scale"]["runs"]
        inflight = scale.get("max_in_flight", 0)
        rows.append({"workload": "scale", "target": f"{runs} runs in flight together",
                     "measured": f"{inflight} at once", "met": inflight >= runs})
        rss = scale.get("peak_rss_mb")
        rows.append({"workload": "scale", "target": "worker RSS < 150 MB",
                     "measured": f"{rss:.0f} MB peak", "met": rss is not None and rss < 150})
        cpu = scale.get("in_flight_cpu_pct")
        rows.append({"workload": "scale", "target": "worker CPU < 2 % of a core while they run",
                     "measured": None if cpu is None else f"{cpu:.2f} %",
                     "met": None if cpu is None else cpu < 2.0})
    return rows


def analyse(w: Workload, worker: Measured, runs: list[dict[str, Any]],
            histories: dict[str, list[dict[str, Any]]], window_start: float, window_end: float,
            release: float | None) -> dict[str, Any]:
    """A workload's figures from its runs' state histories and the worker's samples.

    Latencies count from each run's scheduled time (or `release`, when later); CPU from the
    samples between `window_start` and `window_end`.
    """
    assert worker.sampler
    claims: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    scheduled: list[float] = []
    finals: dict[str, int] = {}
    pending_at: list[float] = []
    per_run: list[list[float | None]] = []  # claim, start, end; seconds after scheduled
    running_spans: list[tuple[float, float]] = []
    for run in runs:
        due = parse_ts(run["expected_start_time"])
        if release is not None:
            due = max(due, release)
        scheduled.append(due)
        states = sorted(histories.get(run["id"], []), key=lambda s: s["timestamp"])
        pending = next((parse_ts(s["timestamp"]) for s in states if s["type"] == "PENDING"),
                       None)
        running = next((parse_ts(s["timestamp"]) for s in states if s["type"] == "RUNNING"),
                       None)
        final = next((s for s in reversed(states) if s["type"] in FINAL), None)
        if pending is not None:
            claims.append(pending - due)
            pending_at.append(pending)
        if running is not None:
            starts.append(running - due)
        per_run.append([rnd(pending - due) if pending is not None else None,
                        rnd(running - due) if running is not None else None,
                        rnd(parse_ts(final["timestamp"]) - due) if final else None])
        if final is not None:
            end = parse_ts(final["timestamp"])
            ends.append(end)
            finals[final["type"]] = finals.get(final["type"], 0) + 1
            if running is not None:
                running_spans.append((running, end))
        elif running is not None:
            running_spans.append((running, window_end))
    first_claim = None
    if w.mode == "cold" and pending_at:
        first_claim = min(pending_at) - worker.started_wall
    origin = worker.started_wall if w.mode == "cold" else (min(scheduled) if scheduled
                                                             else window_start)
    cpu_start = worker.sampler.cpu_at(window_start) or 0.0
    cpu_end = worker.sampler.cpu_at(window_end) or 0.0
    tree_start = worker.sampler.cpu_at(window_start, tree=True) or 0.0
    tree_end = worker.tree_cpu_end if worker.tree_cpu_end is not None else \
        worker.sampler.cpu_at(window_end, tree=True) or 0.0
    samples = worker.sampler.samples
    out: dict[str, Any] = {
        "runs": len(runs),
        "final": finals,
        "completed": finals.get("COMPLETED", 0),
        "makespan_s": round(max(ends) - origin, 3) if ends else None,
        "claim_p50_s": rnd(percentile(claims, 50)),
        "claim_p99_s": rnd(percentile(claims, 99)),
        "start_p50_s": rnd(percentile(starts, 50)),
        "start_p99_s": rnd(percentile(starts, 99)),
        "claimed": len(claims),
        "started": len(starts),
        "cpu_s": round(cpu_end - cpu_start, 3),
        "tree_cpu_s": round(tree_end - tree_start, 3),
        "tree_cpu_per_run_s": round((tree_end - tree_start) / len(runs), 3) if runs else None,
        "cpu_total_s": round(samples[-1].cpu_s, 3) if samples else None,
        "peak_rss_mb": round(worker.sampler.peak_rss_mb, 1),
        "peak_pss_mb": round(worker.sampler.peak_pss_mb, 1),
        "tree_peak_pss_mb": round(worker.sampler.peak_tree_pss_mb, 1),
        "max_in_flight": max_concurrent(running_spans),
        "window_s": round(window_end - window_start, 3),
    }
    if first_claim is not None:
        out["first_claim_s"] = round(first_claim, 3)
    if w.name == "scale":
        out.update(scale_profile(worker, running_spans, w.runs))
    # A one-per-second timeline of the worker (for the chart), relative to its start.
    timeline, next_t = [], 0.0
    for s in samples:
        t = s.wall - worker.started_wall
        if t >= next_t:
            timeline.append([round(t, 2), round(s.cpu_s, 3), round(s.rss_mb, 1)])
            next_t = t + 1.0
    out["timeline"] = timeline
    out["per_run"] = sorted(per_run, key=lambda r: (r[0] is None, r[0] or 0))
    return out


def classify_kube_request(method: str, target: str) -> str:
    """What one kube-apiserver request does, e.g. "watch pods", "list jobs", "get pods",
    "create jobs", "patch pods/status" (namespaces and names left out)."""
    path, _, query = target.partition("?")
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    else:
        return f"{method.lower()} {path or '/'}"
    if not parts:
        return "discovery"
    named = False
    if parts[:1] == ["namespaces"] and len(parts) >= 3:
        parts = parts[2:]
    resource = parts[0] if parts else "/"
    if len(parts) >= 2:
        named = True
        if len(parts) >= 3:
            resource = f"{resource}/{parts[2]}"
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    verb = {"GET": "get" if named else "list", "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete"}.get(method.upper(), method.lower())
    if method.upper() == "GET" and params.get("watch") in ("1", "true", "True"):
        verb = "watch"
    return f"{verb} {resource}"


def kube_figures(histories: dict[str, list[dict[str, Any]]], job_seen: dict[str, float],
                 requests: dict[str, int], runs: int) -> dict[str, Any]:
    """Claim (the run's PENDING state) to its Job seen created, and the kube-apiserver
    requests the worker sent, per run."""
    latencies = []
    for run_id, seen in job_seen.items():
        pending = [parse_ts(s["timestamp"]) for s in histories.get(run_id, [])
                   if s.get("type") == "PENDING"]
        if pending:
            latencies.append(seen - min(pending))
    total = sum(requests.values())
    return {
        "job_created_p50_s": rnd(percentile(latencies, 50)),
        "job_created_p99_s": rnd(percentile(latencies, 99)),
        "jobs_seen": len(latencies),
        "kube_requests": total,
        "kube_requests_per_run": round(total / runs, 2) if runs else None,
        "kube_requests_by_kind": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
    }
