"""Where the benchmark finds its tools and writes its results, the environment its children get,
and its progress lines."""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_ENV = Path(os.environ.get("FLOWHAND_BENCH_ENV", REPO / ".tools" / "bench-prefect"))
PREFECT = BENCH_ENV / "bin" / "prefect"
PY_SPY = BENCH_ENV / "bin" / "py-spy"
FLOWHAND = REPO / ".venv" / "bin" / "flowhand"
ENGINE = REPO / "tests" / "engine.py"
HELLO_FLOW_DIR = REPO / "examples"
BUSYBOX_IMAGE = "flowhand-test/busybox:1"
RESULTS = REPO / "bench" / "results"

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


def clean_env() -> dict[str, str]:
    """Our environment without any Prefect or flowhand settings of the caller."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "FLOWHAND_", "PYTHON"))}
