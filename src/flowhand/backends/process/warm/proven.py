"""The Prefect releases whose runs fork from a warm helper by default: the ONE list.

A release series is here only when the compatibility suite (tests/test_real_flows.py, every
case cold and warm) and the warm-start faults (tests/test_warm_start.py) run warm against it in
CI; tests/prefect_env.py installs one release of each series, and a test fails when the two
lists differ (tests/test_warm_helper.py). Runs of any other Prefect start cold, with one line
saying so. To prove a new series: add its tool environment to tests/prefect_env.py (and
scripts/bootstrap.sh), run both suites green, then add it here.
"""

from __future__ import annotations

#: "major.minor" of each Prefect series the suite runs warm in CI.
PROVEN_PREFECT_SERIES: tuple[str, ...] = ("3.8", "3.9")


def series(version: str) -> str:
    """"3.9.1" -> "3.9"; a pre-release or local build keeps its numeric major.minor."""
    return ".".join(version.split(".")[:2])


def proven(version: str | None) -> bool:
    """Whether runs of this Prefect version may fork from a warm helper."""
    return version is not None and series(version) in PROVEN_PREFECT_SERIES


def described() -> str:
    """The proven series for messages: "3.8.x, 3.9.x"."""
    return ", ".join(f"{name}.x" for name in PROVEN_PREFECT_SERIES)
