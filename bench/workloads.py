"""The workloads: what each one runs, how many runs, and how they are scheduled."""

from __future__ import annotations

from dataclasses import dataclass, field

WORKERS = ("prefect", "flowhand")
WORKER_LABEL = {"prefect": "prefect worker", "flowhand": "flowhand"}


@dataclass
class Workload:
    name: str
    title: str
    runs: int
    sleep: float = 0.0
    backend: str = "process"          # process | docker
    mode: str = "due_now"             # due_now | cold | steady
    job: str = "engine"               # engine | flow
    timeout: float = 300.0            # for all runs to be final, per worker
    prefect_timeout: float | None = None  # Prefect's worker's, when it differs
    workers: tuple[str, ...] = WORKERS
    measures: str = ""
    repeats: int = 1                  # alternating workers; the median repetition is reported
    key: str = "makespan_s"           # ... by this figure
    spacing: float = 1.0              # steady: seconds between two runs' scheduled times
    warm: bool = False                # flowhand with --warm-start (Prefect's worker has none)
    #: The issue's targets as flowhand / Prefect ratios: figure -> (at most, what it is).
    ratio_targets: dict[str, tuple[float, str]] = field(default_factory=dict)


def workloads(quick: bool) -> dict[str, Workload]:
    q = quick
    return {w.name: w for w in [
        Workload("burst", "burst", 20 if q else 100, timeout=300,
                 measures="runs due now, trivial command, process backend",
                 ratio_targets={"makespan_s": (0.5, "makespan"), "cpu_s": (0.1, "worker CPU"),
                                "peak_rss_mb": (0.25, "worker peak RSS")}),
        Workload("wide", "wide", 20 if q else 200, sleep=10 if q else 30, timeout=400,
                 measures="runs due now sleeping in flight together, process backend",
                 ratio_targets={"peak_rss_mb": (0.15, "worker peak RSS"),
                                "cpu_s": (0.1, "worker CPU")}),
        Workload("containers", "containers", 10 if q else 50, backend="docker", timeout=400,
                 measures="runs due now, trivial command, Docker backend, local image",
                 ratio_targets={"makespan_s": (0.7, "makespan"), "cpu_s": (0.2, "worker CPU")}),
        Workload("cold", "cold start", 5 if q else 10, mode="cold", timeout=300, repeats=3,
                 key="first_claim_s",
                 measures="worker started with runs already due: time to first claim",
                 ratio_targets={"first_claim_s": (0.2, "time to first claim")}),
        Workload("steady", "steady", 15 if q else 60, mode="steady", timeout=300,
                 measures="runs scheduled one per second ahead; start lateness"),
        Workload("flow", "real flow", 4 if q else 20, job="flow", timeout=600,
                 measures="a real Prefect flow (examples/hello_flow.py), default command",
                 ratio_targets={"makespan_s": (0.8, "makespan"), "tree_cpu_per_run_s":
                                (1.0, "CPU per run (worker + engines)")}),
        Workload("flow-warm", "real flow, warm", 4 if q else 20, job="flow", warm=True,
                 timeout=600, measures="the same burst; flowhand with --warm-start (each run "
                 "forked by a helper that imported Prefect), Prefect's worker as it is",
                 ratio_targets={"makespan_s": (0.35, "makespan"), "tree_cpu_per_run_s":
                                (0.3, "CPU per run (worker + helpers + engines)")}),
        # Far enough apart that each run starts on an idle machine (a cold run of this flow
        # costs some 3.5 CPU s): start latency with nothing else to wait for.
        Workload("flow-idle", "real flow, warm, one by one", 4 if q else 10, job="flow",
                 warm=True, mode="steady", spacing=8.0, timeout=600,
                 measures="the real flow due every 8 s (idle machine in between), flowhand "
                 "with --warm-start; start latency"),
        # Pods on kwok nodes (no container runs): a completer stands in for kubelet and engine,
        # the same for both workers (bench/kube.py); needs a running scripts/kube-test-cluster.
        Workload("kubernetes", "kubernetes (kwok)", 10 if q else 200, backend="kubernetes",
                 timeout=600, measures="runs due now as Jobs on kwok nodes; claim to Job "
                 "created, kube-apiserver requests per run",
                 ratio_targets={"makespan_s": (0.5, "makespan"), "cpu_s": (0.2, "worker CPU"),
                                "kube_requests_per_run": (0.5, "kube-apiserver requests per run")}),
        # Each run sleeps long enough for all to be in flight together: on 2 cores the server
        # next to the workers starts about 4 runs a second, so 1000 take some 250 s to start.
        # (The literal figure is 60 s: --size scale=1000x60.)
        Workload("scale", "scale", 100 if q else 1000, sleep=30 if q else 300,
                 timeout=300 if q else 900, prefect_timeout=300 if q else 600,
                 measures="runs sleeping in flight together; RSS and CPU per minute"),
    ]}
