"""Test helpers: the Prefect versions under test, the stand-in engine's command, and the real
server and API client of `harness` (shared with the benchmark), under the names tests import.

Prefect is never imported here: it lives in a separate virtual environment (`.tools/prefect`, or
`$FLOWHAND_PREFECT_ENV`), exactly as flowhand's runtime never imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.api import API, FINAL
from harness.prefect_server import PREFECT_ENV, REPO, PrefectServer, free_port

__all__ = ["API", "ENGINE", "FINAL", "PREFECT_ENV", "PREFECT_ENVS", "REPO", "PrefectServer",
           "engine_command", "free_port", "skip_or_fail"]

#: The Prefect versions flowhand is tested against, each in a tool environment of its own
#: (scripts/bootstrap.sh installs them; an environment variable points elsewhere).
PREFECT_ENVS = {
    "3.8.8": PREFECT_ENV,
    "3.9.1": Path(os.environ.get("FLOWHAND_PREFECT_391_ENV",
                                 REPO / ".tools" / "prefect-3.9.1")),
}
ENGINE = Path(__file__).resolve().parent / "engine.py"


def engine_command(*args: str) -> str:
    """A job command running the stand-in engine with this interpreter."""
    return " ".join([sys.executable, str(ENGINE), *args])


def skip_or_fail(reason: str) -> None:
    """Skip locally when a prerequisite cannot be made; in CI (CI=true) that is a failure."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)
