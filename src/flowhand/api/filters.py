"""Request bodies for the API's filter endpoints, built from typed fields.

Prefect's filter language nests every condition (`{"flow_runs": {"state": {"type": {"any_":
[...]}}}}`); writing it out by hand at each call site invites typos the server answers with a
422, or worse, silently ignores. These builders hold the few conditions a worker uses; a field
left at None adds no condition.

    FlowRunFilter(states=[StateType.CANCELLING], pool="my-pool", sort="ID_DESC").body()
    # {"flow_runs": {"state": {"type": {"any_": ["CANCELLING"]}}},
    #  "work_pools": {"name": {"any_": ["my-pool"]}}, "sort": "ID_DESC"}

    FlowRunFilter(states=[StateType.SCHEDULED], next_scheduled_before=cutoff, pool="my-pool",
                  queues=["default"]).body()
    # {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}},
    #                "next_scheduled_start_time": {"before_": cutoff.isoformat()}},
    #  "work_pools": {"name": {"any_": ["my-pool"]}},
    #  "work_pool_queues": {"name": {"any_": ["default"]}}}

    TaskRunFilter(flow_run_ids=[run_id], states=[StateType.RUNNING], limit=200).body()
    # {"task_runs": {"flow_run_id": {"any_": [str(run_id)]},
    #                "state": {"type": {"any_": ["RUNNING"]}}}, "limit": 200}

The bodies go to `PrefectClient.read_flow_runs`, `count_flow_runs` and `read_task_runs`, or
through `flowhand.api.pagination` for results longer than one page. An empty sequence is a
condition nothing matches (`any_: []`), as on the server; pass None for "any".
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from flowhand.api.models import StateType

#: Prefect's `FlowRunSort`.
FlowRunSort = Literal[
    "ID_DESC", "START_TIME_ASC", "START_TIME_DESC", "EXPECTED_START_TIME_ASC",
    "EXPECTED_START_TIME_DESC", "NAME_ASC", "NAME_DESC", "NEXT_SCHEDULED_START_TIME_ASC",
    "END_TIME_DESC",
]
#: Prefect's `TaskRunSort`.
TaskRunSort = Literal[
    "ID_DESC", "EXPECTED_START_TIME_ASC", "EXPECTED_START_TIME_DESC", "NAME_ASC", "NAME_DESC",
    "NEXT_SCHEDULED_START_TIME_ASC", "END_TIME_DESC",
]


def _any(values: Sequence[Any]) -> dict[str, list[Any]]:
    return {"any_": [v.value if isinstance(v, StateType) else str(v) for v in values]}


def _page(body: dict[str, Any], sort: str | None, limit: int | None,
          offset: int | None) -> dict[str, Any]:
    if sort is not None:
        body["sort"] = sort
    if limit is not None:
        body["limit"] = limit
    if offset is not None:
        body["offset"] = offset
    return body


@dataclass(frozen=True, kw_only=True)
class FlowRunFilter:
    """A body for `POST /flow_runs/filter` and `/flow_runs/count`; see the module's example."""

    #: Runs with one of these ids.
    ids: Sequence[uuid.UUID | str] | None = None
    #: Runs in one of these state types.
    states: Sequence[StateType] | None = None
    #: Runs that ended after this time.
    ended_after: datetime | None = None
    #: Runs whose next scheduled start is before this time.
    next_scheduled_before: datetime | None = None
    #: Runs whose next scheduled start is after this time.
    next_scheduled_after: datetime | None = None
    #: Runs in this work pool.
    pool: str | None = None
    #: Runs in one of these queues of the pool.
    queues: Sequence[str] | None = None
    sort: FlowRunSort | None = None
    limit: int | None = None
    offset: int | None = None

    def body(self) -> dict[str, Any]:
        runs: dict[str, Any] = {}
        if self.ids is not None:
            runs["id"] = _any(self.ids)
        if self.states is not None:
            runs["state"] = {"type": _any(self.states)}
        if self.ended_after is not None:
            runs["end_time"] = {"after_": self.ended_after.isoformat()}
        scheduled = {key: when.isoformat() for key, when in (
            ("before_", self.next_scheduled_before), ("after_", self.next_scheduled_after))
            if when is not None}
        if scheduled:
            runs["next_scheduled_start_time"] = scheduled
        body: dict[str, Any] = {}
        if runs:
            body["flow_runs"] = runs
        if self.pool is not None:
            body["work_pools"] = {"name": _any([self.pool])}
        if self.queues is not None:
            body["work_pool_queues"] = {"name": _any(self.queues)}
        return _page(body, self.sort, self.limit, self.offset)


@dataclass(frozen=True, kw_only=True)
class TaskRunFilter:
    """A body for `POST /task_runs/filter`; see the module's example."""

    #: Task runs of one of these flow runs.
    flow_run_ids: Sequence[uuid.UUID | str] | None = None
    #: Task runs in one of these state types.
    states: Sequence[StateType] | None = None
    sort: TaskRunSort | None = None
    limit: int | None = None
    offset: int | None = None

    def body(self) -> dict[str, Any]:
        runs: dict[str, Any] = {}
        if self.flow_run_ids is not None:
            runs["flow_run_id"] = _any(self.flow_run_ids)
        if self.states is not None:
            runs["state"] = {"type": _any(self.states)}
        body: dict[str, Any] = {"task_runs": runs} if runs else {}
        return _page(body, self.sort, self.limit, self.offset)
