"""The chart of a benchmark run (matplotlib, from the benchmark's tool environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.environment import say
from bench.workloads import WORKER_LABEL, WORKERS, Workload


def chart(doc: dict[str, Any], specs: dict[str, Workload], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # run from an environment without it (e.g. `.venv/bin/python -m bench`)
        say(f"matplotlib is not installed here: no chart ({path.name})")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    names = [n for n in results if all(k in results[n] for k in WORKERS)]
    colors = {"prefect": "#7a7a7a", "flowhand": "#1f77b4"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    panels = [("makespan_s", "makespan (s)"), ("cpu_s", "worker CPU (s)"),
              ("peak_rss_mb", "worker peak RSS (MB)"), ("start_p99_s", "p99 start latency (s)")]
    for ax, (key, label) in zip(axes.flat[:4], panels, strict=False):
        xs = range(len(names))
        for i, kind in enumerate(WORKERS):
            vals = [results[n][kind].get(key) or 0 for n in names]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in xs], vals, 0.38,
                          label=WORKER_LABEL[kind], color=colors[kind])
            if kind == "flowhand":
                for bar, n in zip(bars, names, strict=False):
                    r = results[n].get("ratios", {}).get(key)
                    if r is not None:
                        ax.annotate(f"{r:.2f}×", (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [specs[n].title for n in names], rotation=20, fontsize=9)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend()
    scale = results.get("scale", {})
    for ax, idx, label in ((axes.flat[4], 2, "scale: worker RSS (MB)"),
                           (axes.flat[5], 1, "scale: worker CPU (% of a core, 5 s)")):
        for kind in WORKERS:
            tl = scale.get(kind, {}).get("timeline")
            if not tl:
                continue
            if idx == 2:
                ax.plot([p[0] for p in tl], [p[2] for p in tl], label=WORKER_LABEL[kind],
                        color=colors[kind])
            else:
                xs2, ys2 = [], []
                for a, b in zip(tl[::5], tl[5::5], strict=False):
                    if b[0] > a[0]:
                        xs2.append(b[0])
                        ys2.append(100 * (b[1] - a[1]) / (b[0] - a[0]))
                ax.plot(xs2, ys2, label=WORKER_LABEL[kind], color=colors[kind])
        ax.set_title(label + (f", {scale.get('runs')} runs" if scale else ""))
        ax.set_xlabel("seconds since the worker started")
        ax.grid(alpha=0.3)
        if scale:
            ax.legend()
    m = doc["machine"]
    fig.suptitle(f"flowhand vs prefect worker — {doc['date']} — {m['nproc']} cores, "
                 f"{m['memory_gib']} GiB, {m['cpu_model']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
