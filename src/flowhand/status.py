"""`flowhand status`: what a pool's workers are doing, without opening the Prefect UI.

Runs in flight (PENDING, RUNNING, CANCELLING) and recently finished ones, read page by page
from the flow-run filter API, as an aligned table or JSON.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter
from flowhand.api.models import FlowRun, StateType
from flowhand.api.pagination import collect as collect_pages
from flowhand.clock import utcnow

IN_FLIGHT = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
FINISHED = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
COLUMNS = ["run", "id", "state", "worker", "infrastructure", "lateness_s", "duration_s"]


async def collect(
    client: PrefectClient, pool: str, recent_minutes: float = 60, limit: int = 200
) -> list[dict[str, Any]]:
    """One row per run: in flight first (oldest first), then finished (newest first)."""
    active = await collect_pages(client.read_flow_runs, FlowRunFilter(
        states=IN_FLIGHT, pool=pool, sort="EXPECTED_START_TIME_ASC").body(), max_items=limit)
    since = utcnow() - timedelta(minutes=recent_minutes)
    done = await collect_pages(client.read_flow_runs, FlowRunFilter(
        states=FINISHED, ended_after=since, pool=pool, sort="END_TIME_DESC").body(),
        max_items=limit)
    return [_row(r) for r in active + done]


def _row(run: FlowRun) -> dict[str, Any]:
    now = utcnow()
    lateness = duration = None
    if run.start_time and run.expected_start_time:
        lateness = round((run.start_time - run.expected_start_time).total_seconds(), 3)
    if run.start_time:
        duration = round(((run.end_time or now) - run.start_time).total_seconds(), 3)
    state = run.state
    return {
        "run": run.name,
        "id": str(run.id),
        "state": f"{state.type.value}/{state.name}" if state else None,
        "worker": run.worker_name,
        "infrastructure": run.infrastructure_pid,
        "lateness_s": lateness,
        "duration_s": duration,
    }


def render(rows: list[dict[str, Any]], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no runs in flight or recently finished"

    def cell(row: dict[str, Any], key: str) -> str:
        value = row[key]
        if key == "id":
            return str(value)[:8]
        if key == "infrastructure" and isinstance(value, str) and len(value) > 40:
            return value[:18] + "…" + value[-12:]
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    header = [c.upper().replace("_S", " (s)") for c in COLUMNS]
    table = [header] + [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {COLUMNS.index("lateness_s"), COLUMNS.index("duration_s")}
    return "\n".join(
        "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                  for i, (v, w) in enumerate(zip(line, widths, strict=True))).rstrip()
        for line in table
    )
