"""The Engine API's wire formats, decoded without the daemon: log frames, JSON lines, errors.

Pure, so each is checked by a fast unit test: the multiplexed log stream (an 8-byte header per
frame when the container has no TTY), the newline-delimited JSON of `/events` and of pulls, the
filters `/events` takes, the exit facts in a `die`/`oom` event, and the error an answer means.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

#: Fragments of a 404's message that mean the image is missing (the others are other objects),
#: the ones docker-py tells `ImageNotFound` by, so the same answers are read the same way.
IMAGE_NOT_FOUND_FRAGMENTS = (
    "no such image",
    "not found: does not exist or no pull access",
    "repository does not exist",
    "was found but does not match the specified platform",
)
_FRAME_HEADER = struct.Struct(">BxxxL")


class EngineError(Exception):
    """A call to the Docker daemon failed (the daemon's answer or the connection)."""


class Unreachable(EngineError):
    """The daemon could not be reached, or the connection broke before it answered."""


class APIError(EngineError):
    """The daemon answered with an error status; `explanation` is its own message."""

    def __init__(self, status_code: int, explanation: str) -> None:
        super().__init__(f"{status_code}: {explanation}")
        self.status_code = status_code
        self.explanation = explanation


class NotFound(APIError):
    """404: the container, network, ... does not exist."""


class ImageNotFound(NotFound):
    """404 naming a missing image."""


def api_error(status_code: int, body: bytes) -> APIError:
    """The error for an answer with status `status_code` and body `body`."""
    try:
        message = json.loads(body)["message"]
        explanation = str(message)
    except (ValueError, KeyError, TypeError):
        explanation = body.decode("utf-8", "replace").strip()
    if status_code != 404:
        return APIError(status_code, explanation)
    lowered = explanation.lower()
    if any(fragment in lowered for fragment in IMAGE_NOT_FOUND_FRAGMENTS):
        return ImageNotFound(status_code, explanation)
    return NotFound(status_code, explanation)


def demultiplex(data: bytes) -> bytes:
    """The payloads of a multiplexed log stream (stdout and stderr frames, in order), joined.

    Each frame is `[stream, 0, 0, 0, size (4 bytes, big-endian)]` and `size` bytes. A frame cut
    short at the end (the container gone mid-answer) keeps what arrived.
    """
    out: list[bytes] = []
    offset = 0
    while offset + _FRAME_HEADER.size <= len(data):
        _, size = _FRAME_HEADER.unpack_from(data, offset)
        start = offset + _FRAME_HEADER.size
        out.append(data[start:start + size])
        offset = start + size
    return b"".join(out)


class JsonLines:
    """Decodes a stream of newline-delimited JSON objects fed in chunks of any size."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The objects completed by `chunk`; ValueError for a line that is not a JSON object."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        objects = []
        for line in lines:
            if line.strip():
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError(f"expected a JSON object, got {line[:80]!r}")
                objects.append(value)
        return objects


def filters_param(filters: dict[str, str | list[str]]) -> str:
    """The `filters` query parameter: each filter a list of values, as JSON."""
    return json.dumps({key: [value] if isinstance(value, str) else list(value)
                       for key, value in filters.items()})


@dataclass(frozen=True)
class ContainerEvent:
    """What a container's `die` or `oom` event says."""

    container_id: str
    action: str
    exit_code: int | None = None
    time: int | None = None


def container_event(event: dict[str, Any]) -> ContainerEvent | None:
    """The `die`/`oom` facts of an event from `/events`, or None for any other event."""
    if event.get("Type", "container") != "container":
        return None
    actor = event.get("Actor") or {}
    container_id = actor.get("ID") or event.get("id")
    action = event.get("Action") or event.get("status")
    if not container_id or action not in ("die", "oom"):
        return None
    code = (actor.get("Attributes") or {}).get("exitCode")
    exit_code = int(code) if code is not None and str(code).lstrip("-").isdigit() else None
    stamp = event.get("time")
    return ContainerEvent(
        container_id=str(container_id),
        action=str(action),
        exit_code=exit_code if action == "die" else None,
        time=int(stamp) if isinstance(stamp, int | float) else None,
    )
