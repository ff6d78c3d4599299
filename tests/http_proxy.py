"""A loopback HTTP proxy that answers some requests itself, as a rate-limiting or restarting
front end does: every `every`-th request gets the next status of `statuses` (with
`Retry-After`), the others go to the real server. Threads, so it serves processes under test."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

#: Headers that belong to one hop, not to the request or answer passed on.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
        "host", "upgrade", "proxy-connection", "te", "trailer"}


class FaultingHTTPProxy:
    def __init__(self, target: str, every: int = 3, statuses: tuple[int, ...] = (429,),
                 retry_after: str | None = "1") -> None:
        """`target`: the server's base URL (http://127.0.0.1:PORT)."""
        self.target = target.rstrip("/")
        self.every = every
        self.retry_after = retry_after
        self._statuses = itertools.cycle(statuses)
        self._count = 0
        self._lock = threading.Lock()
        #: Requests answered by the proxy, by status; and all requests seen, by "METHOD path".
        self.faults: Counter[int] = Counter()
        self.seen: Counter[str] = Counter()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault(self, method: str, path: str) -> int | None:
        """The status to answer this request with, or None to pass it on."""
        with self._lock:
            self._count += 1
            self.seen[f"{method} {path.split('?')[0]}"] += 1
            if self._count % self.every:
                return None
            status = next(self._statuses)
            self.faults[status] += 1
            return status

    def upstream(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.target, timeout=60)
            with self._lock:
                self._clients.append(client)
        return client

    def forward(self, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> httpx.Response:
        """The server's answer; a kept-alive connection the server closed meanwhile is
        retried once on a new one (that is the proxy's business, not the client's)."""
        try:
            return self.upstream().request(method, path, content=body, headers=headers)
        except httpx.TransportError:
            return self.upstream().request(method, path, content=body, headers=headers)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for client in self._clients:
            client.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status = proxy.fault(self.command, self.path)
                if status is not None:
                    extra = {"Retry-After": proxy.retry_after} if proxy.retry_after else {}
                    self._answer(status, {"Content-Type": "application/json", **extra},
                                 b'{"detail": "slow down (test proxy)"}')
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                try:
                    answer = proxy.forward(self.command, self.path, body, headers)
                except httpx.TransportError as exc:
                    self._answer(502, {}, f"upstream: {exc}".encode())
                    return
                self._answer(answer.status_code,
                             {k: v for k, v in answer.headers.items() if k.lower() not in _HOP},
                             answer.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        return Handler
