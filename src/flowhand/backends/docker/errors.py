"""The Engine API client's errors in flowhand's terms: the one place that interprets them.

The client (`client`) raises `streams`' classes: `APIError` and its subclasses for answers of the
daemon (with the HTTP status and the daemon's message), `Unreachable` for the connection;
`DOCKER_ERRORS` is all of them, and `flowhand_error` turns one into the `InfrastructureError` a
caller raises.
"""

from __future__ import annotations

from flowhand.backends.docker.streams import (
    APIError,
    EngineError,
    ImageNotFound,
    NotFound,
    Unreachable,
)
from flowhand.errors import BackendUnavailable, InfrastructureError, LaunchFailed

#: What a call to the daemon raises when the call, not flowhand, failed.
DOCKER_ERRORS: tuple[type[Exception], ...] = (EngineError,)


def explain(exc: BaseException) -> str:
    """The daemon's own words when it answered, else the exception's."""
    if isinstance(exc, APIError) and exc.explanation:
        return exc.explanation
    return str(exc) or type(exc).__name__


def is_unreachable(exc: BaseException) -> bool:
    """The daemon could not be reached at all (as opposed to: it answered with an error)."""
    return isinstance(exc, Unreachable)


def unreachable_message(daemon_url: str, reason: str) -> str:
    return (
        f"cannot reach the Docker daemon at {daemon_url}: {reason}. Is Docker running, and may "
        "this user use its socket? Set docker.base_url (or DOCKER_HOST)."
    )


def flowhand_error(
    exc: BaseException,
    doing: str,
    *,
    daemon_url: str,
    kind: type[InfrastructureError] = LaunchFailed,
    image: str | None = None,
    hint: str | None = None,
) -> InfrastructureError:
    """The error to raise for `exc`, which ended an attempt to `doing` ("create the container").

    `kind` says what the failure means to the caller: LaunchFailed (this run cannot start: every
    failure is one), BackendUnavailable (the daemon as a whole does not work: every failure is
    one) or InfrastructureError (watching or stopping a run: an unreachable daemon is
    BackendUnavailable, anything else the daemon said is InfrastructureError). `image`: the
    image the call needed on the Docker host, when a missing image is the likely cause; `hint`:
    what to check, appended to a failure that no rule below explains better.
    """
    text = explain(exc)
    if kind is BackendUnavailable or is_unreachable(exc):
        message = unreachable_message(daemon_url, text)
        return LaunchFailed(message) if kind is LaunchFailed else BackendUnavailable(message)
    if image is not None and isinstance(exc, ImageNotFound):
        return kind(
            f"image {image!r} is not present on the Docker host ({text}). Pull or build it "
            "there, or set image_pull_policy to IfNotPresent or Always so flowhand pulls it."
        )
    # A missing network is a plain 404 (NotFound): the daemon's message is the only thing that
    # tells it from other missing objects.
    if isinstance(exc, NotFound) and "network" in text.lower():
        return kind(f"cannot {doing}: {text}. Create the network (docker network create NAME) "
                    "or fix networks / network_mode in the job variables.")
    return kind(f"cannot {doing}: {text}" + (f"; {hint}" if hint else ""))
