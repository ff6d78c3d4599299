"""A small HTTP endpoint for probes and scraping: /healthz, /readyz, /metrics.

(`flowhand.prefect_health` serves Prefect's /health with the same machinery.)

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

from flowhand.errors import ConfigError
from flowhand.metrics import Metrics

log = structlog.get_logger("flowhand.http")

#: (ok, reason) for /readyz.
ReadinessCheck = Callable[[], tuple[bool, str]]
#: (ok, reason) for /healthz.
LivenessCheck = Callable[[], tuple[bool, str]]


#: An answer: (status line, content type, body).
Answer = tuple[str, str, bytes]
#: Answers a GET for a path.
Router = Callable[[str], Answer]


async def serve_http(
    host: str,
    port: int,
    liveness: LivenessCheck,
    readiness: ReadinessCheck,
    metrics: Metrics,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through `task_status`."""
    await serve_routes(host, port, lambda path: route(path, liveness, readiness, metrics),
                       task_status=task_status)


async def serve_routes(
    host: str,
    port: int,
    router: Router,
    name: str = "http",
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `router`'s answers until cancelled; reports the bound port through `task_status`."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                                   reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} for the {name} endpoint: "
                          f"{exc.strerror or exc}; choose another host or port") from None
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info(f"{name}.listening", host=host, port=bound)
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
                    status, ctype, body = router(path)
                    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                    await stream.send(head.encode() + body)
            except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                return

    async with listener:
        await listener.serve(handle)


def route(
    path: str, liveness: LivenessCheck, readiness: ReadinessCheck, metrics: Metrics
) -> Answer:
    """flowhand's own endpoints: /healthz, /readyz and /metrics; 404 for anything else."""
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
    if path in ("/healthz", "/readyz"):
        ok, reason = (liveness if path == "/healthz" else readiness)()
        body = json.dumps({"status": "ok" if ok else "unavailable", "reason": reason}).encode()
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
    return NOT_FOUND


NOT_FOUND: Answer = ("404 Not Found", "text/plain",
                     b"not found: try /healthz, /readyz or /metrics\n")
