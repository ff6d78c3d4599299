"""The supervisor side of Prefect's attempt-control session, written for flowhand.

Prefect's engine (3.8 and later) connects back to the process that started it when it finds
PREFECT__CONTROL_PORT and PREFECT__CONTROL_TOKEN in its environment, once its SIGTERM handler is
armed (the flow has been loaded and is about to run). Over that one loopback TCP connection:

* the engine sends the token and a newline; a connection with any other token is dropped, and the
  token works once, so nothing else on the machine can take over the session;
* version two: the engine sends a hello, ``\\x00PF`` + version byte + capability byte; we answer
  with the same frame naming the version we chose (two, with outcome receipts, when offered);
* before stopping the run we send one intent byte (``c`` cancel, ``r`` reschedule, ``q``
  relinquish); the engine answers ``a`` once it has recorded it, and only then do we send
  SIGTERM, so the engine knows what the signal means (cancel: on_cancellation hooks, CANCELLED;
  reschedule and relinquish: exit without proposing a state, the worker owns the next one);
* version two: when the engine reports a final (or paused) state it may instead send an outcome
  receipt, ``\\x01`` + 4-byte big-endian length + JSON, which we acknowledge with ``\\x02``.

The first acknowledged intent or receipt is the attempt's conclusion and never changes; the
session then ends. Everything is best effort: an engine that never connects (an older Prefect,
a custom command, a run stopped before its flow started), a connection that drops, an engine that
does not answer within a second, all leave the worker on its signal-only path.
"""

from __future__ import annotations

import enum
import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.typing import FilteringBoundLogger

from flowhand.backends.base import EngineOutcome, StopIntent

INTENT_BYTES: dict[StopIntent, bytes] = {
    StopIntent.CANCEL: b"c",
    StopIntent.RESCHEDULE: b"r",
    StopIntent.RELINQUISH: b"q",
}
ACK = b"a"
LEGACY_VERSION = 1
CURRENT_VERSION = 2
RECEIPT_CAPABILITY = 0x01
NEGOTIATION_PREFIX = b"\x00PF"
NEGOTIATION_FRAME_SIZE = len(NEGOTIATION_PREFIX) + 2
RECEIPT_PREFIX = b"\x01"
RECEIPT_ACK = b"\x02"
MAX_RECEIPT_SIZE = 4096
MAX_TOKEN_LINE = 256
#: The environment variables that tell the engine where to connect.
PORT_ENV = "PREFECT__CONTROL_PORT"
TOKEN_ENV = "PREFECT__CONTROL_TOKEN"


class ProtocolError(ValueError):
    """The engine sent something the protocol does not allow; the session ends."""


class SignalStatus(enum.Enum):
    """What became of an intent: the path the stop takes, logged with each stop."""

    ACKNOWLEDGED = "acknowledged"            # the engine recorded it; SIGTERM now means it
    ALREADY_CONCLUDED = "already_concluded"  # the engine had already reported its outcome
    NOT_CONNECTED = "not_connected"          # no session (old Prefect, custom command, too early)
    NOT_ACKNOWLEDGED = "not_acknowledged"    # connected, but no answer in time or it dropped


def encode_negotiation(version: int, capabilities: int) -> bytes:
    return NEGOTIATION_PREFIX + bytes((version, capabilities))


def decode_negotiation(frame: bytes) -> tuple[int, int]:
    if len(frame) != NEGOTIATION_FRAME_SIZE or not frame.startswith(NEGOTIATION_PREFIX):
        raise ProtocolError("malformed negotiation frame")
    return frame[-2], frame[-1]


def choose_version(version: int, capabilities: int) -> tuple[int, int]:
    """Version two with receipts when the engine offers both, else version one."""
    if version >= CURRENT_VERSION and capabilities & RECEIPT_CAPABILITY:
        return CURRENT_VERSION, RECEIPT_CAPABILITY
    return LEGACY_VERSION, 0


def decode_receipt(payload: bytes) -> EngineOutcome:
    """An outcome receipt's JSON, checked as strictly as the engine writes it."""
    if len(payload) > MAX_RECEIPT_SIZE:
        raise ProtocolError("receipt too large")
    try:
        data: Any = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("receipt is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("receipt is not an object")
    disposition = data.get("disposition")
    if disposition == "ORCHESTRATION_ABORTED":
        if set(data) != {"disposition"}:
            raise ProtocolError("aborted receipt with extra fields")
        return EngineOutcome(state_type=None)
    if disposition != "STATE_REPORTED":
        raise ProtocolError(f"unknown receipt disposition {disposition!r}")
    if set(data) != {"disposition", "state_id", "state_type", "state_name"}:
        raise ProtocolError("state receipt with wrong fields")
    state_type, state_name = data["state_type"], data["state_name"]
    if not (isinstance(state_type, str) and isinstance(state_name, str)) or not state_type \
            or len(state_type) > 64:
        raise ProtocolError("state receipt with a bad state type or name")
    try:
        uuid.UUID(str(data["state_id"]))
    except ValueError:
        raise ProtocolError("state receipt with a bad state id") from None
    return EngineOutcome(state_type=state_type, state_name=state_name)


def encode_receipt(outcome: EngineOutcome) -> bytes:
    """The engine's side of a receipt; flowhand uses it only in tests and fault injection."""
    if outcome.state_type is None:
        body: dict[str, str] = {"disposition": "ORCHESTRATION_ABORTED"}
    else:
        body = {"disposition": "STATE_REPORTED", "state_id": str(uuid.uuid4()),
                "state_type": outcome.state_type, "state_name": outcome.state_name or ""}
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return RECEIPT_PREFIX + len(payload).to_bytes(4, "big") + payload


#: What concluded an attempt: the engine's receipt, or the intent it acknowledged.
Conclusion = EngineOutcome | StopIntent


class AttemptSession:
    """One run's attempt-control session: a one-shot loopback listener and its connection.

    `open()` before the process starts (it gives the environment to pass on), `serve()` in a task
    while the process runs, `signal()` from whoever stops it, `aclose()` at the end.
    """

    def __init__(self, ack_timeout: float = 1.0, auth_timeout: float = 5.0,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.token = secrets.token_hex(16)
        self.ack_timeout = ack_timeout
        self.auth_timeout = auth_timeout
        self.port: int | None = None
        #: Called once the engine has authenticated (the backend reads the engine's cwd then).
        self.on_connect = on_connect
        self.conclusion: Conclusion | None = None
        self.version: int | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._stream: anyio.abc.SocketStream | None = None
        self._pending: StopIntent | None = None
        self._send_lock = anyio.Lock()
        self._acked = anyio.Event()
        self._ended = anyio.Event()
        self._authenticated = False
        self.rejected = 0

    @property
    def connected(self) -> bool:
        return self._stream is not None

    @property
    def ever_connected(self) -> bool:
        """The engine authenticated at some point (the session may have ended since)."""
        return self._authenticated

    async def open(self) -> dict[str, str]:
        """Listen on a free loopback port; the variables to put in the engine's environment."""
        listeners = (await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=0)).listeners
        # One address (127.0.0.1), so one listener; a SocketListener can accept one at a time.
        listener = listeners[0]
        assert isinstance(listener, anyio.abc.SocketListener)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        self._listener = listener
        return {PORT_ENV: str(self.port), TOKEN_ENV: self.token}

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._listener is not None:
                await self._listener.aclose()
                self._listener = None
            if self._stream is not None:
                await self._stream.aclose()
                self._stream = None
        self._ended.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    async def serve(self) -> None:
        """Accept the engine's connection, then handle its messages until the session ends."""
        try:
            accepted = await self._accept()
            if accepted is None:
                return
            self._stream, reader = accepted
            self._authenticated = True
            if self.on_connect is not None:
                self.on_connect()
            await self._read_messages(reader)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError, OSError, ProtocolError):
            pass
        finally:
            await self.aclose()

    async def _accept(
        self,
    ) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream] | None:
        while self._listener is not None:
            stream = await self._listener.accept()
            # One reader for the whole connection: the hello may arrive with the token.
            reader = BufferedByteReceiveStream(stream)
            token = b""
            with anyio.move_on_after(self.auth_timeout):
                try:
                    token = await reader.receive_until(b"\n", MAX_TOKEN_LINE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound,
                        anyio.BrokenResourceError, OSError):
                    token = b""
            if token and secrets.compare_digest(token.strip(), self.token.encode()):
                # One engine per token: nobody can replace it or connect again.
                await self._listener.aclose()
                self._listener = None
                return stream, reader
            self.rejected += 1
            await stream.aclose()
        return None

    async def _read_messages(self, reader: BufferedByteReceiveStream) -> None:
        while True:
            kind = await reader.receive_exactly(1)
            if kind == NEGOTIATION_PREFIX[:1]:
                frame = kind + await reader.receive_exactly(NEGOTIATION_FRAME_SIZE - 1)
                version, capabilities = choose_version(*decode_negotiation(frame))
                self.version = version
                await self._send(encode_negotiation(version, capabilities))
            elif kind == RECEIPT_PREFIX:
                if self.version != CURRENT_VERSION:
                    raise ProtocolError("receipt before negotiating receipts")
                size = int.from_bytes(await reader.receive_exactly(4), "big")
                if size > MAX_RECEIPT_SIZE:
                    raise ProtocolError("receipt too large")
                outcome = decode_receipt(await reader.receive_exactly(size))
                if self.conclusion is None:
                    self.conclusion = outcome
                    await self._send(RECEIPT_ACK)
                return
            elif kind == ACK:
                if self._pending is None:
                    raise ProtocolError("acknowledgement without an intent")
                if self.conclusion is None:
                    self.conclusion = self._pending
                    self._acked.set()
                return
            else:
                raise ProtocolError(f"unexpected byte {kind!r}")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._stream is None:
                raise anyio.ClosedResourceError
            await self._stream.send(data)

    async def signal(self, intent: StopIntent) -> SignalStatus:
        """Tell the engine why it is being stopped; wait up to `ack_timeout` for its answer."""
        if self.conclusion is not None:
            return SignalStatus.ALREADY_CONCLUDED
        if self._stream is None:
            # A session that ended without a conclusion is a dropped one.
            return (SignalStatus.NOT_ACKNOWLEDGED if self._authenticated
                    else SignalStatus.NOT_CONNECTED)
        if self._pending is not None:
            return SignalStatus.NOT_ACKNOWLEDGED
        self._pending = intent
        try:
            await self._send(INTENT_BYTES[intent])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return self._status_without_ack()
        with anyio.move_on_after(self.ack_timeout):
            async with anyio.create_task_group() as tg:
                async def ended() -> None:
                    await self._ended.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(ended)
                await self._acked.wait()
                tg.cancel_scope.cancel()
        if self._acked.is_set() and self.conclusion is intent:
            return SignalStatus.ACKNOWLEDGED
        return self._status_without_ack()

    def _status_without_ack(self) -> SignalStatus:
        if isinstance(self.conclusion, EngineOutcome):
            return SignalStatus.ALREADY_CONCLUDED
        return SignalStatus.NOT_ACKNOWLEDGED

    @property
    def outcome(self) -> EngineOutcome | None:
        """The engine's receipt, when the attempt concluded with one."""
        return self.conclusion if isinstance(self.conclusion, EngineOutcome) else None

    @property
    def acknowledged_intent(self) -> StopIntent | None:
        return self.conclusion if isinstance(self.conclusion, StopIntent) else None


#: What each path means for the run, in the log line that says which one a stop took.
_PATHS = {
    SignalStatus.ACKNOWLEDGED: "the engine acknowledged the intent; SIGTERM follows",
    SignalStatus.ALREADY_CONCLUDED: "the engine had already reported its outcome; waiting for "
                                    "it to exit",
    SignalStatus.NOT_CONNECTED: "no attempt-control session (an engine older than Prefect 3.8, "
                                "a custom command, or a flow not started yet); signals only",
    SignalStatus.NOT_ACKNOWLEDGED: "the engine did not acknowledge the intent (dropped or "
                                   "ignored it); signals only",
}


async def deliver_intent(session: AttemptSession | None, intent: StopIntent,
                         log: FilteringBoundLogger) -> SignalStatus:
    """Tell the engine why it is stopped, and log which path the stop takes."""
    status = SignalStatus.NOT_CONNECTED if session is None else await session.signal(intent)
    level = "info" if status in (SignalStatus.ACKNOWLEDGED,
                                 SignalStatus.ALREADY_CONCLUDED) else "warning"
    getattr(log, level)("flow_run.stop_intent", intent=intent.value, path=status.value,
                        meaning=_PATHS[status])
    return status
