"""A small HTTP endpoint for probes and scraping: /healthz, /readyz, /metrics.

Served on the worker's event loop with anyio sockets: three fixed routes do not need a web
framework, and the endpoint stays up exactly as long as the loop it reports on.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import anyio.abc
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flowhand.metrics import Metrics

log = structlog.get_logger("flowhand.http")

#: (ok, reason) for /readyz.
ReadinessCheck = Callable[[], tuple[bool, str]]
#: (ok, reason) for /healthz.
LivenessCheck = Callable[[], tuple[bool, str]]


async def serve_http(
    host: str,
    port: int,
    liveness: LivenessCheck,
    readiness: ReadinessCheck,
    metrics: Metrics,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through `task_status`."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info("http.listening", host=host, port=bound)
    task_status.started(bound)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        chunk = await stream.receive(4096)
                        if not chunk:
                            break
                        request += chunk
                    line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
                    path = line[1].split("?", 1)[0] if len(line) >= 2 else "/"
                    status, ctype, body = _route(path, liveness, readiness, metrics)
                    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                    await stream.send(head.encode() + body)
            except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                return

    async with listener:
        await listener.serve(handle)


def _route(
    path: str, liveness: LivenessCheck, readiness: ReadinessCheck, metrics: Metrics
) -> tuple[str, str, bytes]:
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
    if path in ("/healthz", "/readyz"):
        ok, reason = (liveness if path == "/healthz" else readiness)()
        body = json.dumps({"status": "ok" if ok else "unavailable", "reason": reason}).encode()
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
    return "404 Not Found", "text/plain", b"not found: try /healthz, /readyz or /metrics\n"
