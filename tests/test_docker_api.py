"""The Docker Engine API client's pure parts (log frames, JSON lines, events, errors, where the
daemon is), and faults a real engine cannot be made to produce, from a scripted fake daemon on a
Unix socket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from flowhand.backends.docker.client import Engine, endpoint
from flowhand.backends.docker.events import EVENT_FILTERS, next_delay
from flowhand.backends.docker.streams import (
    APIError,
    ContainerEvent,
    EngineError,
    ImageNotFound,
    JsonLines,
    NotFound,
    Unreachable,
    api_error,
    container_event,
    demultiplex,
    filters_param,
)


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_demultiplex_joins_stdout_and_stderr_payloads_in_order() -> None:
    """Frames of both streams come back as their payloads in order; a cut last frame keeps
    what arrived and a cut header is dropped."""
    data = frame(1, b"out 1\n") + frame(2, b"err 1\n") + frame(1, b"") + frame(1, b"out 2\n")
    assert demultiplex(data) == b"out 1\nerr 1\nout 2\n"
    assert demultiplex(data + frame(2, b"partial line\n")[:-5]) == b"out 1\nerr 1\nout 2\npartial "
    assert demultiplex(data + b"\x01\x00\x00") == b"out 1\nerr 1\nout 2\n"
    assert demultiplex(b"") == b""


def test_json_lines_decode_objects_split_anywhere() -> None:
    """Objects split across chunks at any byte come out whole, blank lines are skipped, and a
    line that is not a JSON object is a ValueError."""
    text = b'{"a": 1}\n\n{"b": "x\\ny"}\n{"c": [1, 2]}\n'
    for size in (1, 3, len(text)):
        decoder = JsonLines()
        objects = []
        for start in range(0, len(text), size):
            objects += decoder.feed(text[start:start + size])
        assert objects == [{"a": 1}, {"b": "x\ny"}, {"c": [1, 2]}], size
    assert JsonLines().feed(b'{"open": ') == []
    with pytest.raises(ValueError):
        JsonLines().feed(b"[1, 2]\n")
    with pytest.raises(ValueError):
        JsonLines().feed(b"{not json\n")


def test_event_filters_and_exit_facts() -> None:
    """The events followed are die/oom of containers with a flow run label, as JSON lists; a
    die event gives its exit code, an oom none, and other events are ignored."""
    assert json.loads(filters_param(EVENT_FILTERS)) == {
        "type": ["container"], "event": ["die", "oom"], "label": ["io.prefect.flow-run-id"]}
    die = {"Type": "container", "Action": "die", "time": 1700000000,
           "Actor": {"ID": "abc", "Attributes": {"exitCode": "137", "io.prefect.flow-run-id": "r"}}}
    assert container_event(die) == ContainerEvent("abc", "die", 137, 1700000000)
    oom = {"Type": "container", "Action": "oom", "Actor": {"ID": "abc", "Attributes": {}}}
    assert container_event(oom) == ContainerEvent("abc", "oom", None, None)
    # The old form (API < 1.22) names the container and action at the top.
    assert container_event({"status": "die", "id": "def"}) == ContainerEvent("def", "die")
    odd = {"Action": "die", "Actor": {"ID": "x", "Attributes": {"exitCode": "n/a"}}}
    assert container_event(odd) == ContainerEvent("x", "die", None)
    assert container_event({"Type": "container", "Action": "start", "Actor": {"ID": "a"}}) is None
    assert container_event({"Type": "network", "Action": "die", "Actor": {"ID": "a"}}) is None
    assert container_event({"Type": "container", "Action": "die", "Actor": {}}) is None


def test_resubscription_backs_off_unless_the_stream_was_healthy() -> None:
    """A failed subscription or a stream dying young doubles the wait up to 30 s; a stream that
    lived over 30 s is followed again at once."""
    assert next_delay(0.0, None) == 0.5
    assert next_delay(8.0, 2.0) == 16.0
    assert next_delay(20.0, None) == 30.0
    assert next_delay(30.0, 31.0) == 0.0


def test_api_errors_keep_the_daemons_words_and_kind() -> None:
    """A 404 naming an image is ImageNotFound, another 404 NotFound, anything else APIError,
    each with the daemon's message (or the body's text when it is not JSON)."""
    image = api_error(404, b'{"message": "No such image: busybox:9"}')
    assert type(image) is ImageNotFound and image.explanation == "No such image: busybox:9"
    pull = api_error(404, b'{"message": "pull access denied: repository does not exist"}')
    assert type(pull) is ImageNotFound
    container = api_error(404, b'{"message": "No such container: abc"}')
    assert type(container) is NotFound and container.status_code == 404
    conflict = api_error(409, b'{"message": "Conflict. The name is in use"}')
    assert type(conflict) is APIError and conflict.explanation == "Conflict. The name is in use"
    assert api_error(502, b"  Bad Gateway\n").explanation == "Bad Gateway"


def test_endpoint_is_read_as_docker_py_reads_it(tmp_path: Path) -> None:
    """The local socket by default, DOCKER_HOST or base_url otherwise, https with TLS settings
    from DOCKER_CERT_PATH, and a clear error for what cannot be used."""
    local = endpoint(None, {})
    assert (local.socket_path, local.pid_prefix) == ("/var/run/docker.sock",
                                                     "http+docker://localhost")
    assert endpoint(None, {"DOCKER_HOST": "unix:///run/d.sock"}).socket_path == "/run/d.sock"
    tcp = endpoint("tcp://127.0.0.1:2375", {"DOCKER_HOST": "unix:///ignored.sock"})
    assert (tcp.socket_path, tcp.pid_prefix, tcp.tls) == (None, "http://127.0.0.1:2375", None)
    assert tcp.address == "127.0.0.1:2375"
    with pytest.raises(EngineError, match="client certificate"):
        endpoint("tcp://127.0.0.1:2376", {"DOCKER_CERT_PATH": str(tmp_path)})
    with pytest.raises(EngineError, match="ca.pem does not exist"):
        endpoint("tcp://127.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1",
                                          "DOCKER_CERT_PATH": str(tmp_path)})
    assert endpoint("https://127.0.0.1:2376", {}).tls is not None
    with pytest.raises(EngineError, match="ssh:// daemons are not supported"):
        endpoint("ssh://user@host", {})
    with pytest.raises(EngineError, match="port is required"):
        endpoint("tcp://127.0.0.1", {})


def answer(status: int, body: bytes = b"", *, chunked: bool = False) -> bytes:
    """An HTTP/1.1 answer as dockerd writes it, kept alive."""
    if chunked:
        return (f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                + (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b""))
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def json_answer(status: int, value: object) -> bytes:
    return answer(status, json.dumps(value).encode())


#: What the fake daemon does for one request: send bytes (then keep the connection, or close it
#: with CLOSE), close at once (None), or never answer (HANG).
CLOSE, HANG = b"<close>", b"<hang>"


class FakeDaemon:
    """A Unix socket that reads requests and plays scripted answers, one list per connection."""

    def __init__(self, path: Path, scripts: list[list[bytes | None]]) -> None:
        self.path, self.scripts = path, scripts
        self.requests: list[bytes] = []
        self.connections = 0

    async def _read_request(self, stream: anyio.abc.SocketStream, buffer: bytes) -> bytes:
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        found = re.search(rb"(?i)content-length: (\d+)", head)
        while len(rest) < (int(found[1]) if found else 0):
            rest += await stream.receive()
        self.requests.append(head + b"\r\n\r\n" + rest)
        return rest[int(found[1]) if found else 0:]

    async def serve(self, stream: anyio.abc.SocketStream) -> None:
        script = self.scripts[self.connections]
        self.connections += 1
        buffer = b""
        async with stream:
            for step in script:
                with contextlib.suppress(anyio.EndOfStream):
                    buffer = await self._read_request(stream, buffer)
                if step is None:
                    return
                if step == HANG:
                    await anyio.sleep_forever()
                await stream.send(step.removesuffix(CLOSE))
                if step.endswith(CLOSE):
                    return
            await anyio.sleep_forever()


@contextlib.asynccontextmanager
async def fake_daemon(
    tmp_path: Path, *scripts: list[bytes | None], call_timeout: float = 5
) -> AsyncIterator[tuple[Engine, FakeDaemon]]:
    daemon = FakeDaemon(tmp_path / "docker.sock", list(scripts))
    listener = await anyio.create_unix_listener(daemon.path)
    where = endpoint(f"unix://{daemon.path}", {})
    engine = Engine(where, timeout=call_timeout, max_calls=2, max_pulls=1)
    engine.api_version = "1.41"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, daemon.serve)
        try:
            yield engine, daemon
        finally:
            await engine.aclose()
            tg.cancel_scope.cancel()


def test_calls_negotiate_the_version_and_reuse_one_connection(tmp_path: Path) -> None:
    """Calls go to the daemon's own API version over one kept-alive connection, nulls are left
    out of bodies and queries, and a connection the daemon closed while idle is replaced."""

    async def main() -> None:
        async with fake_daemon(tmp_path, [
            json_answer(200, {"ApiVersion": "1.43"}),
            json_answer(201, {"Id": "c1"}),
            answer(204) + CLOSE,
        ], [answer(204)]) as (engine, daemon):
            assert await engine.connect() == "1.43"
            assert await engine.create_container({"Image": "x", "Env": None}, "n", None) == {
                "Id": "c1"}
            await engine.start("c1")
            await engine.kill("c1", "SIGTERM")  # the first connection is gone: a new one
            assert daemon.connections == 2
            version, create, start, kill = daemon.requests
            assert version.startswith(b"GET /version HTTP/1.1\r\n")
            assert create.startswith(b"POST /v1.43/containers/create?name=n HTTP/1.1\r\n")
            assert create.endswith(b'\r\n\r\n{"Image": "x"}')
            assert kill.startswith(b"POST /v1.43/containers/c1/kill?signal=SIGTERM HTTP/1.1")

    anyio.run(main)


def test_transport_faults_become_the_errors_their_meaning_calls_for(tmp_path: Path) -> None:
    """No socket is Unreachable naming it, a connection closed before the answer is Unreachable
    too, a daemon that never answers is a timeout (not unreachable), and an old daemon is
    refused naming its version."""

    async def main() -> None:
        gone = Engine(endpoint(f"unix://{tmp_path}/none.sock", {}), timeout=5, max_calls=1,
                      max_pulls=1)
        with pytest.raises(Unreachable, match=f"cannot connect to {tmp_path}/none.sock: No such"):
            await gone.ping()
        async with fake_daemon(tmp_path, [None], [HANG], [json_answer(200, {
                "ApiVersion": "1.12"})], call_timeout=0.5) as (engine, _):
            with pytest.raises(Unreachable, match="connection to .* broke"):
                await engine.start("c1")
            with pytest.raises(EngineError, match="did not answer within 0.5s") as slow:
                await engine.inspect_container("c1")
            assert not isinstance(slow.value, Unreachable)
            with pytest.raises(EngineError, match="speaks Engine API 1.12"):
                await engine.connect()

    anyio.run(main)


def test_streams_report_cut_connections_and_garbled_lines(tmp_path: Path) -> None:
    """An event stream cut mid-line ends in Unreachable after the whole events before it; a
    line that is not JSON is an EngineError; a refused subscription is the daemon's APIError."""
    event = json.dumps({"Action": "die", "Actor": {"ID": "a"}}).encode() + b"\n"

    async def follow(engine: Engine) -> list[dict[str, object]]:
        got = []
        async with engine.events(since=100, filters=EVENT_FILTERS) as events:
            async for item in events:
                got.append(item)
        return got

    async def main() -> None:
        async with fake_daemon(
            tmp_path,
            [answer(200, event + b'{"Action": "d', chunked=True) + CLOSE],
            [answer(200, b"<html>proxy error</html>\n", chunked=True)],
            [json_answer(500, {"message": "too many subscribers"})],
        ) as (engine, daemon):
            received: list[dict[str, object]] = []
            with pytest.raises(Unreachable, match="broke"):
                async with engine.events(since=100, filters=EVENT_FILTERS) as events:
                    async for item in events:
                        received.append(item)
            assert received == [{"Action": "die", "Actor": {"ID": "a"}}]
            with pytest.raises(EngineError, match="not JSON"):
                await follow(engine)
            with pytest.raises(APIError, match="too many subscribers"):
                await follow(engine)
            query = daemon.requests[0].split(b" ")[1].decode()
            assert "since=100" in query and "die" in query

    anyio.run(main)


def test_logs_are_unframed_unless_the_container_has_a_tty(tmp_path: Path) -> None:
    """Logs of a container without a TTY lose their frame headers (chunked or not); with a TTY
    they are kept as sent; `since` and `tail` reach the daemon as docker-py sends them."""
    body = frame(1, b"2024-01-01T00:00:00.000000001Z hello\n") + frame(2, b"oops\n")

    async def main() -> None:
        async with fake_daemon(tmp_path, [
            answer(200, body, chunked=True) + b"0\r\n\r\n", answer(200, body),
        ]) as (engine, daemon):
            framed = await engine.logs("c", tty=False, timestamps=True, since=1.5)
            assert framed == b"2024-01-01T00:00:00.000000001Z hello\noops\n"
            assert await engine.logs("c", tty=True, tail=8) == body
            first, second = (request.split(b" ")[1] for request in daemon.requests)
            assert b"since=1.500000" in first and b"tail=all" in first
            assert b"follow=0" in first and b"tail=8" in second and b"since" not in second

    anyio.run(main)


@pytest.mark.docker
def test_real_engine_logs_with_and_without_a_tty(busybox: str) -> None:
    """Against the real engine: without a TTY stdout and stderr come unframed, with a TTY as
    the terminal wrote them, and an exited container is removed."""

    async def run(engine: Engine, tty: bool) -> bytes:
        created = await engine.create_container({
            "Image": busybox, "Cmd": ["sh", "-c", "echo out; echo err >&2"], "Tty": tty,
            "HostConfig": {"NetworkMode": "host"}}, None, None)
        container_id = str(created["Id"])
        try:
            await engine.start(container_id)
            with anyio.fail_after(30):
                while (await engine.inspect_container(container_id))["State"]["Running"]:
                    await anyio.sleep(0.05)
            return await engine.logs(container_id, tty=tty)
        finally:
            await engine.remove(container_id)
            with pytest.raises(NotFound):
                await engine.inspect_container(container_id)

    async def main() -> tuple[bytes, bytes]:
        engine = Engine(endpoint(None, os.environ), timeout=30, max_calls=2, max_pulls=1)
        try:
            await engine.connect()
            return await run(engine, False), await run(engine, True)
        finally:
            await engine.aclose()

    plain, terminal = anyio.run(main)
    assert sorted(plain.splitlines()) == [b"err", b"out"]
    assert sorted(terminal.split()) == [b"err", b"out"] and b"\r\n" in terminal
