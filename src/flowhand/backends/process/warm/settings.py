"""The `[subprocess]` keys of warm starts (a mixin of the process backend's settings)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class WarmSettings(BaseModel):
    #: Fork each run from a helper that has already imported Prefect's engine (see
    #: docs/backends.md, "Warm starts"); any helper problem falls back to a cold start.
    warm_start: bool = False
    #: Most helpers at once: one per distinct (interpreter, PREFECT_* and PYTHON* environment).
    warm_max_helpers: int = Field(2, ge=1)
    #: A helper without runs for this long leaves (its memory is returned).
    warm_idle_seconds: float = Field(600.0, gt=0)
