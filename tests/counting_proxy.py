"""A loopback HTTP proxy in front of the Prefect API that counts the requests passing through,
and can cut the WebSockets (the event stream) while plain requests go on.

It reads each request's line, headers and body (Content-Length) from the client and forwards
the bytes unchanged; answers are piped back untouched. A WebSocket upgrade is counted once and
its connection then carried both ways as raw bytes. Threads and the standard library only (a
`TCPProxy` that reads what it carries), so it serves processes under test and the bench alike.

    proxy = CountingProxy(server_port)
    ... point a worker at f"http://127.0.0.1:{proxy.port}/api" ...
    proxy.count("POST", "/get_scheduled_flow_runs")
    proxy.cut_websockets()     # drop the open ones and refuse new ones
    proxy.allow_websockets()
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from dataclasses import dataclass

from tests.tcp_proxy import TCPProxy

#: Bytes of a request body kept for tests to look at (filters name the states they ask for).
BODY_KEPT = 4096


@dataclass(frozen=True)
class Request:
    at: float  # time.monotonic() when it was read
    method: str
    path: str  # without the query string, and without the API's "/api" prefix
    body: bytes
    websocket: bool


class CountingProxy(TCPProxy):
    def __init__(self, target_port: int, api_prefix: str = "/api") -> None:
        self.api_prefix = api_prefix
        self.requests: list[Request] = []
        self.websockets_refused = False
        self._websockets: set[socket.socket] = set()
        super().__init__(target_port)

    # -- what tests and the bench read ---------------------------------------------------------

    def since(self, at: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.at >= at]

    def count(self, method: str, path_suffix: str, since: float = 0.0,
              body_contains: bytes = b"") -> int:
        """Requests with this method whose path ends with `path_suffix` (and whose body holds
        `body_contains`), read at or after `since`."""
        return sum(1 for r in self.since(since) if r.method == method
                   and r.path.endswith(path_suffix) and body_contains in r.body)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- faults --------------------------------------------------------------------------------

    def cut_websockets(self) -> None:
        """Drop every open WebSocket and refuse new ones (closed when their upgrade arrives)."""
        with self._lock:
            self.websockets_refused = True
            doomed = list(self._websockets)
            self._websockets.clear()
        for sock in doomed:
            _shut(sock)

    def allow_websockets(self) -> None:
        self.websockets_refused = False

    # -- the proxy -----------------------------------------------------------------------------

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        threading.Thread(target=self._read_requests, args=(client, upstream),
                         daemon=True).start()

    def _read_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            self._forward(client.makefile("rb"), client, upstream)
        except (OSError, ValueError):
            pass
        finally:
            _shut(client)
            _shut(upstream)
            with self._lock:
                self._websockets.discard(client)

    def _forward(self, reader: io.BufferedReader, client: socket.socket,
                 upstream: socket.socket) -> None:
        """Read, count and forward requests until the client closes; a WebSocket goes raw."""
        while head := _read_head(reader):
            method, path, headers, raw = head
            websocket = headers.get("upgrade", "").lower() == "websocket"
            length = int(headers.get("content-length") or 0)
            body = reader.read(length) if length else b""
            path = path.split("?", 1)[0].removeprefix(self.api_prefix)
            with self._lock:
                self.requests.append(Request(time.monotonic(), method, path,
                                             body[:BODY_KEPT], websocket))
                if websocket and self.websockets_refused:
                    return
                if websocket:
                    self._websockets.add(client)
            upstream.sendall(raw + body)
            if websocket or "chunked" in headers.get("transfer-encoding", ""):
                # From here on, frames (or a body this proxy does not parse): raw bytes.
                while data := reader.read1(65536):
                    upstream.sendall(data)
                return


def _read_head(reader: io.BufferedReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """A request's line and headers: (method, path, headers by lower-case name, raw bytes);
    None at the end of the connection."""
    lines: list[bytes] = []
    while not lines or lines[-1] not in (b"\r\n", b"\n"):
        line = reader.readline(65536)
        if not line:
            return None
        if lines or line.strip():
            lines.append(line)
    method, path, *_ = lines[0].decode("latin-1").split(" ")
    headers = {}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, path, headers, b"".join(lines)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
