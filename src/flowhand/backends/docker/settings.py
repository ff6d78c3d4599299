"""What a user configures for Docker runs: the `[docker]` table and a pool's job variables."""

from __future__ import annotations

import re
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.backends.base import BackendSettings, JobConfig

#: Prefect's default image: its release for the worker's Python version.
DEFAULT_IMAGE = (
    f"prefecthq/prefect:{PREFECT_COMPAT_VERSION}-python"
    f"{sys.version_info.major}.{sys.version_info.minor}"
)

ImagePullPolicy = Literal["IfNotPresent", "Always", "IfPossible", "Never"]


class DockerSettings(BackendSettings):
    """The `[docker]` table."""

    base_url: str | None = Field(None, description="Docker daemon URL; default from DOCKER_HOST")
    api_url_rewrite: Literal["auto", "never"] | str = Field(
        "auto",
        description="How the container reaches the API: 'auto' as Prefect does, 'never', or a "
        "hostname that replaces localhost/127.0.0.1 in PREFECT_API_URL",
    )
    kill_grace_seconds: float = Field(30.0, ge=0)
    crash_log_lines: int = Field(20, ge=0)
    #: Named for the threads docker-py calls once ran in; the calls are asynchronous now.
    api_threads: int = Field(
        8, ge=1, le=64, description="Most Docker API calls in flight at once"
    )
    timeout_seconds: float = Field(60.0, gt=0, description="Timeout of one Docker API call")

    @field_validator("api_url_rewrite")
    @classmethod
    def _rewrite_target(cls, value: str) -> str:
        if value in ("auto", "never"):
            return value
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError("must be 'auto', 'never' or a hostname, e.g. host.docker.internal")
        return value


class RegistryCredentials(BaseModel):
    """The data of Prefect's DockerRegistryCredentials block."""

    model_config = ConfigDict(extra="ignore")

    username: str
    password: SecretStr
    registry_url: str
    reauth: bool = True


class DockerJobConfig(JobConfig):
    """The job variables of a Prefect Docker pool."""

    image: str = DEFAULT_IMAGE
    registry_credentials: RegistryCredentials | None = None
    #: None: Prefect's rule, an untagged or `latest` image is pulled Always, any other IfNotPresent.
    image_pull_policy: ImagePullPolicy | None = None
    networks: list[str] = []
    network_mode: str | None = None
    auto_remove: bool = False
    volumes: list[str] = []
    mem_limit: str | None = None
    memswap_limit: str | None = None
    privileged: bool = False
    container_create_kwargs: dict[str, Any] | None = None
    #: Stop watching (not stopping) a container that has not exited after this many seconds.
    container_wait_timeout: int | None = Field(None, gt=0)
