"""The attempt-control session: against Prefect's own engine side, and against faulty engines."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from flowhand.backends.base import EngineOutcome, StopIntent
from flowhand.backends.process.attempt_control import (
    ACK,
    RECEIPT_ACK,
    AttemptSession,
    ProtocolError,
    SignalStatus,
    decode_receipt,
    encode_negotiation,
    encode_receipt,
)
from tests.prefect_env import PREFECT_ENVS, skip_or_fail

Engine = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def with_engine(session: AttemptSession, engine: Engine | None,
                      body: Callable[[], Awaitable[None]], token: str | None = None) -> None:
    """Serve `session` while a fake engine talks to it over a real loopback socket."""
    env = await session.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.serve)
        if engine is not None:
            stream = await anyio.connect_tcp("127.0.0.1", int(env["PREFECT__CONTROL_PORT"]))
            await stream.send(((token or env["PREFECT__CONTROL_TOKEN"]) + "\n").encode())
            tg.start_soon(run_engine, engine, stream)
        await body()
        tg.cancel_scope.cancel()
    await session.aclose()


async def run_engine(engine: Engine, stream: anyio.abc.SocketStream) -> None:
    try:
        await engine(stream)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
        pass
    finally:
        await stream.aclose()


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.01)


async def recv_exactly(stream: anyio.abc.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return data


def test_v2_negotiation_and_receipt_conclude_the_attempt() -> None:
    """A version-two engine is answered with version two and receipts; its receipt is acked,
    becomes the conclusion, and a later intent is ALREADY_CONCLUDED."""
    session = AttemptSession(ack_timeout=0.3)
    seen: list[bytes] = []

    async def engine(stream: anyio.abc.SocketStream) -> None:
        await stream.send(encode_negotiation(2, 1))
        seen.append(await recv_exactly(stream, 5))
        await stream.send(encode_receipt(EngineOutcome("COMPLETED", "Completed")))
        seen.append(await recv_exactly(stream, 1))

    async def body() -> None:
        await until(lambda: len(seen) == 2)
        assert await session.signal(StopIntent.CANCEL) is SignalStatus.ALREADY_CONCLUDED

    anyio.run(with_engine, session, engine, body)
    assert seen == [encode_negotiation(2, 1), RECEIPT_ACK]
    assert session.outcome == EngineOutcome("COMPLETED", "Completed")
    assert session.version == 2


def test_v1_engine_acknowledges_an_intent() -> None:
    """An engine that never negotiates (version one) still gets the intent byte and its
    acknowledgement makes the intent the conclusion."""
    session = AttemptSession(ack_timeout=2)
    got: list[bytes] = []

    async def engine(stream: anyio.abc.SocketStream) -> None:
        got.append(await stream.receive(1))
        await stream.send(ACK)
        await stream.aclose()

    async def body() -> None:
        await until(lambda: session.connected)
        assert await session.signal(StopIntent.RESCHEDULE) is SignalStatus.ACKNOWLEDGED

    anyio.run(with_engine, session, engine, body)
    assert got == [b"r"]
    assert session.acknowledged_intent is StopIntent.RESCHEDULE
    assert session.outcome is None


@pytest.mark.parametrize("fault", ["ignores", "drops", "never_connects", "wrong_token"])
def test_faulty_engines_fall_back_to_signals(fault: str) -> None:
    """An engine that ignores the intent, drops the connection, never connects or has the wrong
    token gets NOT_ACKNOWLEDGED / NOT_CONNECTED, promptly, and no conclusion."""
    session = AttemptSession(ack_timeout=0.3, auth_timeout=0.5)

    async def ignores(stream: anyio.abc.SocketStream) -> None:
        await stream.receive(1)
        await anyio.sleep(5)

    async def drops(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    engine = {"ignores": ignores, "drops": drops, "never_connects": None,
              "wrong_token": ignores}[fault]
    expected = {"ignores": SignalStatus.NOT_ACKNOWLEDGED, "drops": SignalStatus.NOT_ACKNOWLEDGED,
                }.get(fault, SignalStatus.NOT_CONNECTED)

    async def body() -> None:
        if fault == "ignores":
            await until(lambda: session.connected)
        elif fault == "drops":
            await until(lambda: session.ever_connected and not session.connected)
        else:
            await anyio.sleep(0.2)
        started = anyio.current_time()
        assert await session.signal(StopIntent.CANCEL) is expected
        assert anyio.current_time() - started < 1.0

    token = "0" * 32 if fault == "wrong_token" else None
    anyio.run(with_engine, session, engine, body, token)
    assert session.conclusion is None
    assert session.rejected == (1 if fault == "wrong_token" else 0)


@pytest.mark.parametrize("message", [
    b"\x01\x00\x00\x00\x02{}",                # a receipt before negotiating receipts
    b"\x07",                                  # an unknown byte
    ACK,                                      # an acknowledgement of nothing
])
def test_protocol_violations_end_the_session_without_a_conclusion(message: bytes) -> None:
    """A receipt without negotiation, an unknown byte or a stray ack closes the session, and
    the attempt stays unconcluded (the worker then reads the run back as before)."""
    session = AttemptSession(ack_timeout=0.3)

    async def engine(stream: anyio.abc.SocketStream) -> None:
        await stream.send(message)
        await anyio.sleep(5)

    async def body() -> None:
        with anyio.fail_after(5):
            await session.wait_ended()

    anyio.run(with_engine, session, engine, body)
    assert session.conclusion is None
    assert not session.connected


@pytest.mark.parametrize("payload", [
    b"not json", b"[]", b'{"disposition": "WHAT"}',
    b'{"disposition": "ORCHESTRATION_ABORTED", "state_type": "COMPLETED"}',
    b'{"disposition": "STATE_REPORTED", "state_id": "x", "state_type": "COMPLETED",'
    b' "state_name": "Completed"}',
    b'{"disposition": "STATE_REPORTED", "state_id": "6f0c6c1e-5b8a-4c55-9d3c-1a2b3c4d5e6f",'
    b' "state_type": "", "state_name": "Completed"}',
    b"{" + b" " * 5000 + b"}",
])
def test_bad_receipts_are_refused(payload: bytes) -> None:
    """Receipts that are not exactly what the engine writes are refused."""
    with pytest.raises(ProtocolError):
        decode_receipt(payload)


def test_aborted_receipt() -> None:
    """An ORCHESTRATION_ABORTED receipt means the run is not ours to report."""
    outcome = decode_receipt(b'{"disposition":"ORCHESTRATION_ABORTED"}')
    assert outcome.aborted and outcome.state_type is None


# -- against Prefect's own engine side of the session ----------------------------------------

CHILD = textwrap.dedent("""
    import sys, time, uuid
    from prefect._internal import control_listener as cl
    from prefect._internal.attempt_control import EngineOutcomeReceipt
    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import capture_sigterm
    cl.configure_from_env()
    try:
        with capture_sigterm():
            print("armed", flush=True)
            if sys.argv[1] == "receipt":
                receipt = EngineOutcomeReceipt.state_reported(
                    state_id=uuid.uuid4(), state_type="FAILED", state_name="Failed")
                print("receipt acked:", cl.report_engine_outcome(receipt), flush=True)
            else:
                time.sleep(60)
    except TerminationSignal:
        print("terminated with intent:", cl.get_intent(), flush=True)
""")


@pytest.mark.parametrize("version", sorted(PREFECT_ENVS))
def test_prefect_engine_side_interoperates(version: str, tmp_path: Path) -> None:
    """Prefect's own engine-side listener (capture_sigterm) negotiates version two with us, gets
    its receipt acknowledged, and learns the cancel intent before SIGTERM."""
    python = PREFECT_ENVS[version] / "bin" / "python"
    if not python.exists():
        skip_or_fail(f"no Prefect {version} environment at {python.parent.parent}")
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    async def run(mode: str) -> tuple[AttemptSession, str]:
        session = AttemptSession(ack_timeout=2)
        env = {**os.environ, **await session.open(), "PREFECT_HOME": str(tmp_path)}
        out = tmp_path / f"{mode}.out"
        with out.open("wb") as fh:
            process = subprocess.Popen(  # noqa: ASYNC220 - starts at once; polled below
                [str(python), str(script), mode], env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.serve)
                if mode == "intent":
                    await until(lambda: session.connected and session.version is not None,
                                seconds=60)
                    assert await session.signal(StopIntent.CANCEL) is SignalStatus.ACKNOWLEDGED
                    process.send_signal(signal.SIGTERM)
                with anyio.fail_after(60):
                    while process.poll() is None:  # noqa: ASYNC110 - a Popen, not awaitable
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            if process.poll() is None:
                process.kill()
            await session.aclose()
        return session, out.read_text()

    session, output = anyio.run(run, "receipt")
    assert session.version == 2, output
    assert session.outcome == EngineOutcome("FAILED", "Failed"), output
    assert "receipt acked: True" in output

    session, output = anyio.run(run, "intent")
    assert session.acknowledged_intent is StopIntent.CANCEL, output
    assert "terminated with intent: cancel" in output
