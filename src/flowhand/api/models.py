"""Typed views of the Prefect API objects a worker reads.

Only the fields flowhand uses are declared; everything else the server sends is ignored, so a newer
server that adds fields keeps working.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class StateType(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)


class StateDetails(_APIModel):
    flow_run_id: uuid.UUID | None = None
    scheduled_time: datetime | None = None
    transition_id: uuid.UUID | None = None
    deployment_concurrency_lease_id: uuid.UUID | None = None


class State(_APIModel):
    id: uuid.UUID | None = None
    type: StateType
    name: str | None = None
    message: str | None = None
    timestamp: datetime | None = None
    state_details: StateDetails = Field(default_factory=StateDetails)


class EmpiricalPolicy(_APIModel):
    retries: int | None = None
    retry_delay: int | float | None = None
    retry_type: str | None = None


#: The label Prefect's workers (and flowhand) put on a run they claimed: the worker's name.
WORKER_LABEL = "prefect.worker.name"


class FlowRun(_APIModel):
    id: uuid.UUID
    name: str
    flow_id: uuid.UUID
    deployment_id: uuid.UUID | None = None
    work_queue_name: str | None = None
    work_pool_name: str | None = None
    state: State | None = None
    job_variables: dict[str, Any] | None = None
    infrastructure_pid: str | None = None
    run_count: int = 0
    empirical_policy: EmpiricalPolicy = Field(default_factory=EmpiricalPolicy)
    expected_start_time: datetime | None = None
    next_scheduled_start_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state else None

    @property
    def worker_name(self) -> str | None:
        """The worker that labelled the run as claimed (`prefect.worker.name`), if any."""
        name = self.labels.get(WORKER_LABEL)
        return str(name) if name is not None else None


class TaskRun(_APIModel):
    id: uuid.UUID
    flow_run_id: uuid.UUID | None = None
    state: State | None = None


class WorkerFlowRunResponse(_APIModel):
    work_pool_id: uuid.UUID
    work_queue_id: uuid.UUID
    flow_run: FlowRun


class OrchestrationStatus(enum.StrEnum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


class OrchestrationDetails(_APIModel):
    type: str | None = None
    reason: str | None = None
    delay_seconds: float | None = None


class OrchestrationResult(_APIModel):
    state: State | None = None
    status: OrchestrationStatus
    details: OrchestrationDetails = Field(default_factory=OrchestrationDetails)


class WorkPool(_APIModel):
    id: uuid.UUID
    name: str
    type: str
    base_job_template: dict[str, Any] = Field(default_factory=dict)
    is_paused: bool = False
    concurrency_limit: int | None = None
    default_queue_id: uuid.UUID | None = None


class WorkQueue(_APIModel):
    id: uuid.UUID
    name: str
    is_paused: bool = False


class Deployment(_APIModel):
    id: uuid.UUID
    name: str
    flow_id: uuid.UUID
    job_variables: dict[str, Any] = Field(default_factory=dict)
    updated: datetime | None = None
    work_pool_name: str | None = None
    tags: list[str] = Field(default_factory=list)
    entrypoint: str | None = None


class Flow(_APIModel):
    id: uuid.UUID
    name: str
    tags: list[str] = Field(default_factory=list)


class LogRecord(_APIModel):
    """A log line for `POST /logs/`, shown in the run's log tab."""

    name: str = "prefect.flow_runs.worker"
    level: int
    message: str
    timestamp: datetime
    flow_run_id: uuid.UUID
    task_run_id: uuid.UUID | None = None


StatusName = Literal["ACCEPT", "REJECT", "ABORT", "WAIT"]


class PoolWorker(_APIModel):
    """A worker of a pool as the server knows it (from its heartbeats)."""

    name: str
    status: str | None = None
    last_heartbeat_time: datetime | None = None
    heartbeat_interval_seconds: int | None = None
