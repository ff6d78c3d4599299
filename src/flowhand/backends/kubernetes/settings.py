"""What a user configures for Kubernetes runs: the `[kubernetes]` table and a pool's job
variables, as Prefect's kubernetes work pools render them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from flowhand.backends.base import BackendSettings, JobConfig


class KubernetesSettings(BackendSettings):
    """The `[kubernetes]` table."""

    kill_grace_seconds: float | None = Field(
        None, ge=0,
        description="Grace period when a run's Job is deleted; default: the pod's own "
        "terminationGracePeriodSeconds",
    )
    crash_log_lines: int = Field(20, ge=0, description="Last pod log lines in a crash message")
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="Timeout of one Kubernetes API request (watches excepted)"
    )
    watch_timeout_seconds: int = Field(
        300, ge=10, le=3600,
        description="How long one watch request lasts before it is resumed from its last "
        "resourceVersion (the apiserver's timeoutSeconds)",
    )
    context: str | None = Field(
        None, description="kubeconfig context to use instead of the current one"
    )


class KubernetesJobConfig(JobConfig):
    """The job configuration of a Prefect kubernetes pool, after rendering."""

    job_manifest: dict[str, Any] = {}
    namespace: str | None = None
    annotations: dict[str, str] | None = None
    #: Prefect's KubernetesClusterConfig block data: {"config": <kubeconfig dict>, "context_name"}.
    cluster_config: dict[str, Any] | None = None
    #: Prefect stops watching a Job after this long; flowhand deletes it and reports CRASHED.
    job_watch_timeout_seconds: int | None = Field(None, gt=0)
    #: How long a pod may take to start running (waiting for a node counts); then the Job is
    #: deleted and the run CRASHED.
    pod_watch_timeout_seconds: int = Field(60, gt=0)

    @field_validator("job_manifest")
    @classmethod
    def _is_a_job(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value and value.get("kind", "Job") != "Job":
            raise ValueError(f"must be a batch/v1 Job manifest, not kind {value.get('kind')!r}")
        return value

    @field_validator("pod_watch_timeout_seconds", mode="before")
    @classmethod
    def _default_when_unset(cls, value: Any) -> Any:
        return 60 if value is None else value
