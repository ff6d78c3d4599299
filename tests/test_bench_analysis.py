"""The benchmark's analysis and report: figures from run histories and samples, pure functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.analysis import (
    analyse,
    classify_kube_request,
    kube_figures,
    max_concurrent,
    median_repetition,
    percentile,
    ratios,
    scale_profile,
    targets,
)
from bench.profiler import summarise_profile
from bench.report import MARKER_END, MARKER_START, fmt, targets_table, update_markers
from bench.sampler import Sample, Sampler
from bench.workloads import Workload, workloads

T0 = 1_800_000_000.0


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat()


@dataclass
class Worker:
    """A measured worker: a sampler holding given samples, never started."""

    samples: list[Sample]
    started_wall: float = T0
    tree_cpu_end: float | None = None
    sampler: Sampler | None = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(pid=0)
        self.sampler.samples = self.samples
        self.sampler.peak_rss_mb = max((s.rss_mb for s in self.samples), default=0.0)


def test_percentile_interpolates_between_closest_ranks() -> None:
    """p50 of four values lies halfway between the middle two; p99 near the top; none of nothing."""
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([0.0, 10.0], 99) == 9.9
    assert percentile([], 50) is None


def test_max_concurrent_counts_overlapping_spans() -> None:
    """Three spans of which two overlap give two at once; a span ending as one starts does not."""
    assert max_concurrent([(0, 5), (1, 3), (6, 8)]) == 2
    assert max_concurrent([(0, 1), (1, 2)]) == 1
    assert max_concurrent([]) == 0


def test_median_repetition_keeps_the_median_and_summarises_the_others() -> None:
    """Of three repetitions the one with the median key is reported, each summarised in repeats."""
    runs = [{"makespan_s": 3.0, "status": "ok"}, {"makespan_s": 1.0, "status": "ok"},
            {"makespan_s": 2.0, "status": "ok"}]
    chosen = median_repetition(runs, "makespan_s")
    assert chosen["makespan_s"] == 2.0
    assert [r["makespan_s"] for r in chosen["repeats"]] == [3.0, 1.0, 2.0]
    assert median_repetition(runs[:1], "makespan_s") is runs[0]


def test_ratios_are_flowhand_over_prefect_where_both_measured() -> None:
    """A ratio is flowhand's figure over Prefect's; a missing or zero Prefect figure gives none."""
    got = ratios({"makespan_s": 4.0, "cpu_s": 0.0, "peak_rss_mb": 100.0},
                 {"makespan_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": None})
    assert got == {"makespan_s": 0.25}
    assert ratios(None, {"makespan_s": 1.0}) == {}


def test_targets_say_whether_each_was_met() -> None:
    """A burst at 0.4x Prefect's makespan meets its 0.5x target; an unmeasured CPU ratio is open."""
    rows = targets({"burst": {"ratios": {"makespan_s": 0.4}}}, workloads(quick=False))
    by_target = {r["target"]: r for r in rows}
    assert by_target["makespan ≤ 0.5× Prefect's"]["met"] is True
    assert by_target["worker CPU ≤ 0.1× Prefect's"]["met"] is None
    table = targets_table(rows)
    assert "| burst | makespan ≤ 0.5× Prefect's | 0.400× | yes |" in table


def test_analyse_reads_latencies_from_state_histories() -> None:
    """Claim and start latencies count from the release; CPU is read between the window's ends."""
    w = Workload("burst", "burst", runs=2)
    runs = [{"id": "a", "expected_start_time": iso(0)}, {"id": "b", "expected_start_time": iso(0)}]
    histories = {
        "a": [{"type": "SCHEDULED", "timestamp": iso(0)}, {"type": "PENDING", "timestamp": iso(11)},
              {"type": "RUNNING", "timestamp": iso(12)},
              {"type": "COMPLETED", "timestamp": iso(14)}],
        "b": [{"type": "PENDING", "timestamp": iso(13)}, {"type": "RUNNING", "timestamp": iso(15)},
              {"type": "FAILED", "timestamp": iso(16)}],
    }
    worker = Worker([Sample(T0 + 9, 1.0, 50.0, 1.0), Sample(T0 + 20, 3.0, 60.0, 5.0)])
    out = analyse(w, worker, runs, histories, window_start=T0 + 9, window_end=T0 + 20,
                  release=T0 + 10)
    assert out["final"] == {"COMPLETED": 1, "FAILED": 1}
    assert out["completed"] == 1
    assert out["claim_p50_s"] == 2.0
    assert out["start_p50_s"] == 3.5
    assert out["makespan_s"] == 6.0
    assert out["cpu_s"] == 2.0
    assert out["tree_cpu_per_run_s"] == 2.0
    assert out["max_in_flight"] == 1  # a ended (14 s) before b started (15 s)
    assert out["per_run"] == [[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]]


def test_scale_profile_finds_the_stretch_with_runs_in_flight() -> None:
    """Ten runs in flight from 10 s to 70 s: CPU over that stretch, and one row per minute."""
    samples = [Sample(T0 + t, 0.01 * t, 40.0 + t / 10) for t in range(0, 121, 5)]
    worker = Worker(samples)
    spans = [(T0 + 10, T0 + 70)] * 10
    out = scale_profile(worker, spans, runs=10)
    assert out["in_flight_threshold"] == 9
    assert out["in_flight_window_s"] == 60.0
    assert out["in_flight_cpu_pct"] == 1.0
    assert [m["minute"] for m in out["per_minute"]] == [1, 2, 3]


def test_summarise_profile_ranks_frames_by_samples(tmp_path: Path) -> None:
    """Collapsed stacks: a frame on every stack holds all samples inclusive, the leaf its own."""
    path = tmp_path / "p.txt"
    path.write_text("main;poll 30\nmain;claim;post 10\nnot a stack line\n")
    got = summarise_profile(path, top=2)
    assert got["samples"] == 40
    assert got["inclusive_pct"][0] == ["main", 100.0]
    assert got["self_pct"][0] == ["poll", 75.0]


def test_update_markers_replaces_the_block_between_markers_only(tmp_path: Path) -> None:
    """The block between the markers on lines of their own is rewritten; other text is kept."""
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro, mentioning {MARKER_START} inline\n{MARKER_START}\nold\n{MARKER_END}\n"
                   "outro\n")
    assert update_markers(doc, "new\n")
    assert doc.read_text() == (f"intro, mentioning {MARKER_START} inline\n{MARKER_START}\nnew\n"
                               f"{MARKER_END}\noutro\n")
    assert not update_markers(tmp_path / "missing.md", "x")


def test_quick_sizes_are_smaller_and_formatting_marks_missing_figures() -> None:
    """--quick shrinks every workload; a missing figure prints as a dash, floats to two digits."""
    full, quick = workloads(False), workloads(True)
    assert full.keys() == quick.keys()
    assert all(quick[n].runs < full[n].runs for n in full)
    assert fmt(None) == "–"
    assert fmt(1.234) == "1.23"


def test_classify_kube_request_names_verb_and_resource() -> None:
    """A kube-apiserver request is named by what it does, without namespace or object name."""
    assert classify_kube_request("GET", "/api/v1/namespaces/ns/pods?watch=1&rv=5") == "watch pods"
    assert classify_kube_request("GET", "/apis/batch/v1/namespaces/ns/jobs?limit=50") == \
        "list jobs"
    assert classify_kube_request("GET", "/apis/batch/v1/namespaces/ns/jobs/j1") == "get jobs"
    assert classify_kube_request("POST", "/apis/batch/v1/namespaces/ns/jobs") == "create jobs"
    assert classify_kube_request("PATCH", "/api/v1/namespaces/ns/pods/p/status") == \
        "patch pods/status"
    assert classify_kube_request("DELETE", "/apis/batch/v1/namespaces/ns/jobs/j") == \
        "delete jobs"
    assert classify_kube_request("GET", "/api/v1/pods?watch=true") == "watch pods"
    assert classify_kube_request("GET", "/apis/batch/v1") == "discovery"
    assert classify_kube_request("GET", "/version") == "get /version"


def test_kube_figures_time_claim_to_job_and_count_requests_per_run() -> None:
    """Claim-to-Job latency counts from each run's PENDING state; requests are per run."""
    histories = {
        "a": [{"type": "SCHEDULED", "timestamp": iso(0)}, {"type": "PENDING", "timestamp": iso(1)}],
        "b": [{"type": "PENDING", "timestamp": iso(2)}],
        "c": [{"type": "SCHEDULED", "timestamp": iso(0)}],  # never claimed: not counted
    }
    seen = {"a": T0 + 1.5, "b": T0 + 3.0, "c": T0 + 9.0}
    out = kube_figures(histories, seen, {"create jobs": 3, "watch pods": 2, "discovery": 1}, 3)
    assert out["jobs_seen"] == 2
    assert out["job_created_p50_s"] == 0.75
    assert out["job_created_p99_s"] == 0.995
    assert out["kube_requests"] == 6
    assert out["kube_requests_per_run"] == 2.0
    assert list(out["kube_requests_by_kind"]) == ["create jobs", "watch pods", "discovery"]
    assert kube_figures({}, {}, {}, 0)["kube_requests_per_run"] is None
