"""The `[process]` keys of warm starts (a mixin of the process backend's settings)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, computed_field, field_validator

from flowhand.backends.process.warm.proven import described
from flowhand.units import parse_bytes


class WarmSettings(BaseModel):
    #: Fork each run of a proven Prefect release (see `proven.py`) from a helper that has
    #: already imported Prefect's engine (docs/backends.md, "Warm starts"); any other run, and
    #: any helper problem, starts cold.
    warm_start: bool = True
    #: Most helpers at once: one per distinct (interpreter, PREFECT_* and PYTHON* environment).
    warm_max_helpers: int = Field(2, ge=1)
    #: A helper without runs for this long leaves (its memory is returned).
    warm_idle_seconds: float = Field(600.0, gt=0)
    #: A helper is started only while at least this much memory is available (MemAvailable,
    #: and the room under flowhand's cgroup limit); bytes or 512m, 1g; 0: no check.
    warm_memory_budget: int = Field(512 << 20, ge=0)

    @field_validator("warm_memory_budget", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_bytes(value)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warm_start_effective(self) -> str:
        """The effective choice and its reason, as `flowhand config` shows it."""
        if not self.warm_start:
            return "off (warm_start = false): every run starts cold"
        return (f"on: runs of Prefect {described()} fork from a warm helper (at most "
                f"{self.warm_max_helpers}, each started with {self.warm_memory_budget >> 20} MiB "
                "available); other runs start cold, saying why once")
