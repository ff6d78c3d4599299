"""The Docker Engine API, spoken asynchronously over the daemon's socket (or TCP).

Every call is a coroutine on the worker's event loop (`http1`: h11 over anyio streams): no
thread per call, one pool of kept-alive connections.
Where the daemon is comes from `docker.base_url` or DOCKER_HOST, read as docker-py reads it
(`docker.utils.parse_host`, so a container's `infrastructure_pid` keeps Prefect's form), with
DOCKER_TLS_VERIFY and DOCKER_CERT_PATH for `tcp://`. The API version is the daemon's own,
asked once (`/version`), as docker-py's `version="auto"` does. Failures are `streams`' errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import anyio
import anyio.abc
import docker.errors
import docker.utils

from flowhand import __version__
from flowhand.backends.docker.http1 import BROKEN, ConnectFailed, Connection, Pool
from flowhand.backends.docker.streams import (
    EngineError,
    JsonLines,
    Unreachable,
    api_error,
    demultiplex,
    filters_param,
)

#: What a call raises below the client: a timeout, no connection, a broken one.
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (TimeoutError, ConnectFailed, *BROKEN)
#: The oldest Engine API flowhand speaks (Docker 1.12), docker-py's own minimum.
MIN_API_VERSION = (1, 24)


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is, and how to reach it."""

    #: docker-py's form of the address: `http+unix:///var/run/docker.sock`, `https://h:2376`.
    url: str
    #: The prefix of a container's infrastructure_pid (docker-py's `base_url`).
    pid_prefix: str
    #: The Unix socket, when the daemon is local.
    socket_path: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def address(self) -> str:
        """The socket path or host:port, for messages."""
        return self.socket_path or urlsplit(self.url).netloc

    async def connect(self) -> anyio.abc.ByteStream:
        """A new connection to the daemon; OSError when there is none."""
        if self.socket_path:
            return await anyio.connect_unix(self.socket_path)
        parts = urlsplit(self.url)
        host, port = parts.hostname or "localhost", parts.port or 2375
        if self.tls is not None:
            return await anyio.connect_tcp(host, port, ssl_context=self.tls, tls_hostname=host)
        return await anyio.connect_tcp(host, port)


def _tls_context(cert_path: str | None, verify: bool) -> ssl.SSLContext:
    """TLS as docker-py's `from_env` sets it up: the client certificate from the cert path,
    the daemon's certificate checked against its `ca.pem` when DOCKER_TLS_VERIFY is set."""
    directory = cert_path or os.path.join(os.path.expanduser("~"), ".docker")
    cert, key, ca = (os.path.join(directory, name) for name in ("cert.pem", "key.pem", "ca.pem"))
    if verify and not os.path.isfile(ca):
        raise EngineError(f"DOCKER_TLS_VERIFY is set but {ca} does not exist (DOCKER_CERT_PATH)")
    context = ssl.create_default_context(cafile=ca if verify else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if not (os.path.isfile(cert) and os.path.isfile(key)):
        raise EngineError(f"TLS needs a client certificate and key: {cert} and {key} "
                          "(DOCKER_CERT_PATH) do not both exist")
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:
        raise EngineError(f"cannot load the TLS client certificate {cert}: {exc}") from None
    return context


def endpoint(base_url: str | None, environ: Mapping[str, str]) -> Endpoint:
    """The daemon at `base_url`, else DOCKER_HOST, else the local socket; EngineError if the
    address cannot be used."""
    cert_path = environ.get("DOCKER_CERT_PATH") or None
    verify = environ.get("DOCKER_TLS_VERIFY", "") != ""
    tls_env = bool(cert_path or verify)
    try:
        url = str(docker.utils.parse_host(base_url or environ.get("DOCKER_HOST"), tls=tls_env))
    except docker.errors.DockerException as exc:
        raise EngineError(str(exc)) from None
    if url.startswith("http+unix://"):
        return Endpoint(url=url, pid_prefix="http+docker://localhost",
                        socket_path=url[len("http+unix://"):])
    if url.startswith("https://"):
        tls = _tls_context(cert_path, verify) if tls_env else ssl.create_default_context()
        return Endpoint(url=url, pid_prefix=url, tls=tls)
    if url.startswith("http://"):
        return Endpoint(url=url, pid_prefix=url)
    raise EngineError(f"{url.split(':', 1)[0]}:// daemons are not supported; use unix:// or "
                      "tcp:// (forward a remote socket with `ssh -L`)")


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed connection, else the exception's."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


class Engine:
    """One Docker daemon's API: a connection pool and the calls the Docker backend makes."""

    def __init__(self, where: Endpoint, *, timeout: float, max_calls: int,
                 max_pulls: int) -> None:
        self.where = where
        self.timeout = timeout
        #: Ordinary calls at once; pulls (minutes long) have their own slots, the event stream
        #: its own connection, so neither starves an inspect.
        self.calls = anyio.CapacityLimiter(max_calls)
        self.pulls = anyio.CapacityLimiter(max_pulls)
        self.api_version = ""
        self._pool = Pool(where.connect, "docker" if where.socket_path else
                          urlsplit(where.url).netloc)
        self._headers = [("User-Agent", f"flowhand/{__version__}")]

    @property
    def pid_prefix(self) -> str:
        return self.where.pid_prefix

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _error(self, exc: BaseException) -> EngineError:
        if isinstance(exc, ConnectFailed):
            return Unreachable(f"cannot connect to {self.where.address}: {_reason(exc)}")
        if isinstance(exc, TimeoutError):
            return EngineError(f"the Docker daemon did not answer within {self.timeout:g}s "
                               "(docker.timeout_seconds)")
        return Unreachable(f"the connection to {self.where.address} broke: {_reason(exc)}")

    def _url(self, path: str, *args: str, versioned: bool = True) -> str:
        path = path.format(*(quote(arg, safe="/:") for arg in args))
        return f"/v{self.api_version}{path}" if versioned else path

    def _request(
        self, url: str, params: Mapping[str, Any] | None, body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[str, list[tuple[str, str]], bytes | None]:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        fields = [*self._headers, *(headers or {}).items()]
        content = None
        if body is not None:
            # Top-level nulls are dropped, as docker-py does: the daemon reads some as invalid.
            content = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
            fields.append(("Content-Type", "application/json"))
        return (f"{url}?{query}" if query else url), fields, content

    async def _call(
        self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """One request; its answer's body. An error status or a failed connection raises
        EngineError."""
        target, fields, content = self._request(url, params, body, headers)
        async with self.calls:
            try:
                with anyio.fail_after(self.timeout):
                    reply = await self._pool.request(method, target, fields, content)
            except _TRANSPORT_ERRORS as exc:
                raise self._error(exc) from None
        if reply.status >= 400:
            raise api_error(reply.status, reply.body)
        return reply.body

    async def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        body = await self._call(method, url, **kwargs)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise EngineError(f"the daemon answered {url} with {body[:80]!r}, not a JSON "
                              "object")
        return data

    # -- the calls ------------------------------------------------------------------------------

    async def connect(self) -> str:
        """Learn the daemon's API version (its `/version`); EngineError if it is too old."""
        version = str((await self._json("GET", self._url("/version", versioned=False)))
                      .get("ApiVersion") or "")
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if len(parts) != 2 or parts < MIN_API_VERSION:
            raise EngineError(f"the daemon speaks Engine API {version or '(unknown)'}; flowhand "
                              "needs 1.24 (Docker 1.12) or newer")
        self.api_version = version
        return version

    async def ping(self) -> None:
        await self._call("GET", self._url("/_ping", versioned=False))

    async def create_container(self, body: Mapping[str, Any], name: str | None,
                               platform: str | None) -> dict[str, Any]:
        return await self._json("POST", self._url("/containers/create"), body=body,
                                params={"name": name, "platform": platform})

    async def connect_network(self, network: str, container_id: str) -> None:
        await self._call("POST", self._url("/networks/{}/connect", network),
                         body={"Container": container_id, "EndpointConfig": {}})

    async def start(self, container_id: str) -> None:
        await self._call("POST", self._url("/containers/{}/start", container_id))

    async def kill(self, container_id: str, signal: str) -> None:
        await self._call("POST", self._url("/containers/{}/kill", container_id),
                         params={"signal": signal})

    async def remove(self, container_id: str) -> None:
        """Remove the container, running or not (`docker rm -f`)."""
        await self._call("DELETE", self._url("/containers/{}", container_id),
                         params={"force": "1"})

    async def inspect_container(self, container_id: str) -> dict[str, Any]:
        return await self._json("GET", self._url("/containers/{}/json", container_id))

    async def inspect_image(self, image: str) -> dict[str, Any]:
        return await self._json("GET", self._url("/images/{}/json", image))

    async def logs(self, container_id: str, *, tty: bool, timestamps: bool = False,
                   since: float | None = None, tail: int | None = None) -> bytes:
        """The container's output so far (stdout and stderr), without the stream framing."""
        params = {"stdout": 1, "stderr": 1, "timestamps": int(timestamps), "follow": 0,
                  "tail": "all" if tail is None else tail,
                  "since": None if since is None else format(since, "f")}
        data = await self._call("GET", self._url("/containers/{}/logs", container_id),
                                params=params)
        # Without a TTY the daemon frames stdout and stderr (8-byte headers); with one it sends
        # the terminal's bytes as they are.
        return data if tty else demultiplex(data)

    async def login(self, credentials: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json("POST", self._url("/auth"), body=credentials)

    # -- streams --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def events(
        self, *, since: int, filters: dict[str, str | list[str]]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Subscribed to `/events` (from `since`, matching `filters`): the events as they come."""
        params = {"since": str(since), "filters": filters_param(filters)}
        async with self._stream("GET", self._url("/events"), params=params) as lines:
            yield lines

    @contextlib.asynccontextmanager
    async def pull(
        self, repository: str, tag: str, auth_header: str | None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A pull under way: its progress messages (an `error` one when it failed midway)."""
        headers = {"X-Registry-Auth": auth_header} if auth_header else {}
        async with self.pulls, self._stream(
            "POST", self._url("/images/create"),
            params={"fromImage": repository, "tag": tag}, headers=headers,
        ) as lines:
            yield lines

    @contextlib.asynccontextmanager
    async def _stream(
        self, method: str, url: str, *, params: Mapping[str, str],
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        target, fields, _ = self._request(url, params, None, headers)
        try:
            # Connected and answered within the timeout; then the answer may take any time.
            with anyio.fail_after(self.timeout):
                conn, status = await self._pool.send(method, target, fields, None)
        except _TRANSPORT_ERRORS as exc:
            raise self._error(exc) from None
        try:
            if status >= 400:
                raise api_error(status, await self._read_all(conn))
            yield self._objects(conn)
        finally:
            # Never kept: a stream may be left mid-answer.
            await conn.aclose()

    async def _read_all(self, conn: Connection) -> bytes:
        try:
            with anyio.fail_after(self.timeout):
                return await conn.read()
        except _TRANSPORT_ERRORS as exc:
            raise self._error(exc) from None

    async def _objects(self, conn: Connection) -> AsyncIterator[dict[str, Any]]:
        decoder = JsonLines()
        try:
            async for chunk in conn.chunks():
                for item in decoder.feed(chunk):
                    yield item
        except BROKEN as exc:
            raise self._error(exc) from None
        except ValueError as exc:
            raise EngineError(f"the daemon sent a line that is not JSON: {exc}") from None
