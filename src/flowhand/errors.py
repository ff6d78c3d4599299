"""The exceptions flowhand raises, as one tree.

    FlowhandError
    ├── ConfigError            bad TOML, unknown keys, bad values, missing pool or queue
    ├── APIError               anything that went wrong talking to the Prefect API
    │   ├── APIUnreachable     transport errors or retryable statuses that outlasted the retries
    │   ├── APIResponseError   a body that is not what the API documents (garbage, wrong shape)
    │   └── APIStatusError     a non-retryable HTTP status
    │       ├── NotFound       404
    │       ├── Conflict       409
    │       └── AuthError      401 / 403: a configuration problem, never retried silently
    ├── JobConfigError         the pool's template and the job variables do not make a valid job
    │   └── PolicyViolation    a job variable breaks the worker operator's policy
    └── InfrastructureError    a backend could not start, watch or stop a run
        ├── LaunchFailed       the infrastructure could not be started (the run is CRASHED)
        └── BackendUnavailable the backend as a whole does not work (e.g. the Docker daemon is down)
"""

from __future__ import annotations


class FlowhandError(Exception):
    """Base class of every error flowhand raises on purpose."""


class ConfigError(FlowhandError):
    """The configuration cannot be used; the message says where and what was expected."""


class APIError(FlowhandError):
    """A call to the Prefect API failed."""


class APIUnreachable(APIError):
    """The API could not be reached, or kept answering with retryable errors."""


class APIResponseError(APIError):
    """The API answered with a body flowhand cannot understand."""


class APIStatusError(APIError):
    """The API answered with a non-retryable error status."""

    def __init__(self, status_code: int, method: str, path: str, detail: str) -> None:
        self.status_code = status_code
        self.method = method
        self.path = path
        self.detail = detail
        super().__init__(f"{method} {path} answered {status_code}: {detail}")


class NotFound(APIStatusError):
    """404: the object does not exist (any more)."""


class Conflict(APIStatusError):
    """409: the object already exists."""


class AuthError(APIStatusError):
    """401/403: credentials are missing or wrong; an operator must act."""


class JobConfigError(FlowhandError):
    """The base job template and job variables do not resolve to a valid job."""


class PolicyViolation(JobConfigError):
    """A job variable breaks the worker operator's policy."""


class InfrastructureError(FlowhandError):
    """A backend failed to start, watch or stop infrastructure."""


class LaunchFailed(InfrastructureError):
    """The infrastructure for one run could not be started."""


class BackendUnavailable(InfrastructureError):
    """The backend itself is not usable right now (not specific to one run)."""
