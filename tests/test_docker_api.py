"""The Docker Engine API client's pure parts (log frames, JSON lines, events, errors, where the
daemon is), and faults a real engine cannot be made to produce, through httpx.MockTransport."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from flowhand.backends.docker.client import Endpoint, Engine, endpoint
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


Handler = Callable[[httpx.Request], httpx.Response]


def engine_with(handler: Handler) -> Engine:
    where = Endpoint(url="http+unix:///mock.sock", pid_prefix="http+docker://localhost",
                     socket_path="/mock.sock")
    return Engine(where, timeout=5, max_calls=2, max_pulls=1,
                  transport=httpx.MockTransport(handler))


def test_calls_negotiate_the_version_and_map_transport_faults() -> None:
    """Calls go to the daemon's own API version, nulls are left out of bodies and queries, and
    a refused connection, a reset and a timeout each become the error their meaning calls for."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/version":
            return httpx.Response(200, json={"ApiVersion": "1.41"})
        if request.url.path.endswith("/start"):
            raise httpx.ConnectError("refused", request=request) from OSError(111, "Refused")
        if request.url.path.endswith("/kill"):
            raise httpx.ReadError("reset", request=request)
        if request.url.path.endswith("/json"):
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(201, json={"Id": "c1"})

    async def main() -> None:
        engine = engine_with(handler)
        assert await engine.connect() == "1.41"
        assert await engine.create_container({"Image": "x", "Env": None}, None, None) == {
            "Id": "c1"}
        create = seen[-1]
        assert create.url.path == "/v1.41/containers/create" and not create.url.query
        assert json.loads(create.content) == {"Image": "x"}
        with pytest.raises(Unreachable, match="cannot connect to /mock.sock: Refused"):
            await engine.start("c1")
        with pytest.raises(Unreachable, match="connection to /mock.sock broke"):
            await engine.kill("c1", "SIGTERM")
        with pytest.raises(EngineError, match="did not answer within 5s") as timeout:
            await engine.inspect_container("c1")
        assert not isinstance(timeout.value, Unreachable)
        await engine.aclose()

    anyio.run(main)


def test_an_old_daemon_is_refused() -> None:
    """A daemon below API 1.24 is refused with a message naming its version."""
    engine = engine_with(lambda request: httpx.Response(200, json={"ApiVersion": "1.12"}))
    with pytest.raises(EngineError, match="speaks Engine API 1.12"):
        anyio.run(engine.connect)


class CutStream(httpx.AsyncByteStream):
    """Some bytes, then whatever a broken connection raises."""

    def __init__(self, data: bytes, error: Exception) -> None:
        self.data, self.error = data, error

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self.data
        raise self.error


def test_streams_report_cut_connections_and_garbled_lines() -> None:
    """An event stream cut mid-line ends in Unreachable after the whole events before it; a
    line that is not JSON is an EngineError; a refused subscription is the daemon's APIError."""
    responses: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["since"] == "100"
        assert json.loads(request.url.params["filters"])["event"] == ["die", "oom"]
        return responses.pop(0)

    event = json.dumps({"Action": "die", "Actor": {"ID": "a"}}).encode() + b"\n"
    reset = httpx.ReadError("reset")
    responses += [
        httpx.Response(200, stream=CutStream(event + b'{"Action": "d', reset)),
        httpx.Response(200, content=b"<html>proxy error</html>\n"),
        httpx.Response(500, json={"message": "too many subscribers"}),
    ]

    async def follow(engine: Engine) -> list[dict[str, object]]:
        got = []
        async with engine.events(since=100, filters=EVENT_FILTERS) as events:
            async for item in events:
                got.append(item)
        return got

    async def main() -> None:
        engine = engine_with(handler)
        received: list[dict[str, object]] = []
        with pytest.raises(Unreachable, match="broke: reset"):
            async with engine.events(since=100, filters=EVENT_FILTERS) as events:
                async for item in events:
                    received.append(item)
        assert received == [{"Action": "die", "Actor": {"ID": "a"}}]
        with pytest.raises(EngineError, match="not JSON"):
            await follow(engine)
        with pytest.raises(APIError, match="too many subscribers"):
            await follow(engine)
        await engine.aclose()

    anyio.run(main)


def test_logs_are_unframed_unless_the_container_has_a_tty() -> None:
    """Logs of a container without a TTY lose their frame headers; with a TTY they are kept as
    sent; `since` and `tail` reach the daemon as docker-py sends them."""
    body = frame(1, b"2024-01-01T00:00:00.000000001Z hello\n")

    def handler(request: httpx.Request) -> httpx.Response:
        params = request.url.params
        assert (params["stdout"], params["stderr"], params["follow"]) == ("1", "1", "0")
        if "since" in params:
            assert params["since"] == "1.500000" and params["tail"] == "all"
        return httpx.Response(200, content=body)

    async def main() -> None:
        engine = engine_with(handler)
        engine.api_version = "1.41"
        framed = await engine.logs("c", tty=False, timestamps=True, since=1.5)
        assert framed == b"2024-01-01T00:00:00.000000001Z hello\n"
        assert await engine.logs("c", tty=True, tail=8) == body
        await engine.aclose()

    anyio.run(main)
