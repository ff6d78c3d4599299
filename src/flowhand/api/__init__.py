"""The Prefect REST API, as a worker sees it."""

from flowhand.api.client import PrefectClient
from flowhand.api.models import (
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    OrchestrationStatus,
    State,
    StateType,
    WorkPool,
)

__all__ = [
    "Deployment",
    "Flow",
    "FlowRun",
    "OrchestrationResult",
    "OrchestrationStatus",
    "PrefectClient",
    "State",
    "StateType",
    "WorkPool",
]
