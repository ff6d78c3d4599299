"""The server's event stream (`/api/events/out`, a WebSocket): state changes of one work pool's
flow runs, as the server records them.

The protocol is the one Prefect's own worker uses to observe cancellations
(`prefect.events.clients.PrefectEventSubscriber`): open the socket with the `prefect`
subprotocol, send `{"type": "auth", "token": ...}` (the API key, else the auth string; the
server answers `auth_success` or closes with 1008), then one `{"type": "filter", ...}`; events
follow as `{"type": "event", "event": {...}}`. The filter asks only for what a worker acts on:
flow runs related to this pool entering SCHEDULED (any name: Scheduled, Late, AwaitingRetry,
...), CANCELLING or CANCELLED. The server first replays the stored events since `since`, so a
reconnect misses little of what happened meanwhile.

Every failure ends `listen` with `StreamLost` and a one-line reason; reconnecting is the
caller's (`flowhand.worker.wakeups`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, WebSocketNetworkError

from flowhand.api.models import StateType
from flowhand.api.transport import APITransport

STREAM_PATH = "events/out"
#: An event carries its state message (up to 100 kB); room for that and the rest.
MAX_MESSAGE_BYTES = 1 << 20
#: A silent connection is found dead within twice this (ping, then wait for the pong).
PING_SECONDS = 10.0
#: How long the server has to answer the credentials.
AUTH_TIMEOUT_SECONDS = 30.0
#: The state types whose changes a worker acts on.
WATCHED_STATES = (StateType.SCHEDULED, StateType.CANCELLING, StateType.CANCELLED)
#: WebSocket close code of a refused `auth` message.
POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class RunEvent:
    """A flow run of the pool entered a state."""

    flow_run_id: uuid.UUID
    state_type: StateType
    #: When the server recorded it (the server's clock).
    occurred: datetime
    #: The run's work queue, when the event names it.
    queue: str | None

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> RunEvent | None:
        """The run event in one of the stream's events; None for anything else."""
        try:
            resource = event["resource"]
            kind, _, run_id = str(resource["prefect.resource.id"]).rpartition(".")
            if kind != "prefect.flow-run":
                return None
            queue = next((str(related.get("prefect.resource.name"))
                          for related in event.get("related") or ()
                          if related.get("prefect.resource.role") == "work-queue"), None)
            return cls(uuid.UUID(run_id), StateType(resource["prefect.state-type"]),
                       datetime.fromisoformat(event["occurred"]), queue)
        except (KeyError, TypeError, ValueError):
            return None


class StreamLost(Exception):
    """The stream could not be opened, or ended; the message says why in one line."""


def run_events_filter(pool_id: uuid.UUID, since: datetime) -> dict[str, Any]:
    """Prefect's `EventFilter` for the state changes a worker of pool `pool_id` acts on."""
    return {
        # `until` bounds the live stream too: far enough that it never ends it.
        "occurred": {"since": since.isoformat(),
                     "until": (since + timedelta(days=3650)).isoformat()},
        "event": {"prefix": ["prefect.flow-run."]},
        "resource": {"labels": {"prefect.state-type": [s.value for s in WATCHED_STATES]}},
        "any_resource": {"id": [f"prefect.work-pool.{pool_id}"]},
        "order": "ASC",
    }


class EventStream:
    """The events of one pool's flow runs, over the API transport's own HTTP client."""

    def __init__(self, transport: APITransport, pool_id: uuid.UUID, token: str | None) -> None:
        self.transport = transport
        self.pool_id = pool_id
        self.token = token

    async def listen(self, since: datetime, on_open: Callable[[], None],
                     on_event: Callable[[RunEvent], None]) -> NoReturn:
        """Open the stream (events from `since` on), call `on_open` once it is, then
        `on_event` with each run event, until it is lost: raises StreamLost."""
        try:
            async with self.transport.websocket(
                    STREAM_PATH, subprotocols=["prefect"],
                    max_message_size_bytes=MAX_MESSAGE_BYTES,
                    keepalive_ping_interval_seconds=PING_SECONDS,
                    keepalive_ping_timeout_seconds=PING_SECONDS) as socket:
                reason = await self._serve(socket, since, on_open, on_event)
        except Exception as exc:  # noqa: BLE001 - whatever breaks the stream, it is lost
            raise StreamLost(describe(exc)) from exc
        raise StreamLost(reason)

    async def _serve(self, socket: AsyncWebSocketSession, since: datetime,
                     on_open: Callable[[], None], on_event: Callable[[RunEvent], None]) -> str:
        """Authenticate, subscribe and pass events on; why the stream ended."""
        try:
            await socket.send_json({"type": "auth", "token": self.token})
            answer = json.loads(await socket.receive_text(timeout=AUTH_TIMEOUT_SECONDS))
            if answer.get("type") != "auth_success":
                return f"the server did not accept the stream's credentials: {answer}"
            await socket.send_json({"type": "filter",
                                    "filter": run_events_filter(self.pool_id, since)})
            on_open()
            while True:
                message = json.loads(await socket.receive_text())
                if message.get("type") == "event":
                    event = RunEvent.parse(message.get("event") or {})
                    if event is not None:
                        on_event(event)
        except WebSocketDisconnect as exc:
            if exc.code == POLICY_VIOLATION:
                return (f"the server refused the stream's credentials ({exc.reason}): check "
                        "PREFECT_API_KEY or PREFECT_API_AUTH_STRING")
            return f"the server closed the stream ({exc.code}{': ' if exc.reason else ''}" \
                   f"{exc.reason or ''})"
        except WebSocketNetworkError:
            return "the connection was lost (no answer to a ping, or a network error)"
        except TimeoutError:
            return f"the server did not answer the credentials within {AUTH_TIMEOUT_SECONDS:g} s"
        except (ValueError, AttributeError) as exc:
            return f"the server sent something that is not an event message: {exc}"


def describe(exc: BaseException) -> str:
    """One line for a failure, looking through the exception groups of task groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text}"
