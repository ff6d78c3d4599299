"""Sending one logical request to the Prefect API: headers, connection limits and retries.

Every request carries the headers Prefect's server expects. Transport errors and the statuses
Prefect itself treats as transient are retried with capped exponential backoff and jitter,
honouring `Retry-After`; maintenance windows are waited out without counting tries. Any other
error status becomes the matching `APIStatusError`.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx
import structlog
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from structlog.typing import FilteringBoundLogger

from flowhand import PREFECT_API_VERSION, PREFECT_COMPAT_VERSION, __version__
from flowhand.api.responses import error_detail, status_error
from flowhand.api.retry import RETRY_STATUSES, backoff_seconds, retry_after_seconds
from flowhand.errors import APIUnreachable

log: FilteringBoundLogger = structlog.get_logger("flowhand.api")

#: The User-Agent must match the server's `^prefect/<version> (API <v>)$`: the server reads the
#: client version from it to pick orchestration rules. A local-version suffix keeps it parseable
#: while saying who we are.
USER_AGENT = f"prefect/{PREFECT_COMPAT_VERSION}+flowhand.{__version__} (API {PREFECT_API_VERSION})"


def auth_header(api_key: str | None, auth_string: str | None) -> dict[str, str]:
    """The Authorization header Prefect clients send; the auth string wins when both are set."""
    if auth_string:
        token = base64.b64encode(auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


def prefect_headers(
    api_key: str | None, auth_string: str | None, worker_name: str | None
) -> dict[str, str]:
    """Headers of every request: who we are, the API version, credentials, the worker's name."""
    headers = {
        "User-Agent": USER_AGENT,
        "X-PREFECT-API-VERSION": PREFECT_API_VERSION,
        **auth_header(api_key, auth_string),
    }
    if worker_name:
        headers["X-Prefect-Worker-Name"] = worker_name
    return headers


def _tls_verification(api_url: str) -> bool:
    """Whether httpx must build a TLS context (some 40 ms of start-up, loading CA files).

    A plain-HTTP API reached without a proxy never uses TLS (redirects are not followed), so
    it gets none; everything else verifies certificates as usual.
    """
    proxied = any(os.environ.get(name) or os.environ.get(name.lower())
                  for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    return proxied or not api_url.lower().startswith("http://")


class APITransport:
    """One HTTP connection pool to the API, and the retry loop around each request.

    `transport` lets tests inject faults with `httpx.MockTransport`; `sleep` lets them skip
    the backoff waits.
    """

    def __init__(
        self,
        api_url: str,
        *,
        headers: dict[str, str],
        timeout_seconds: float,
        max_retries: int,
        max_connections: int,
        retry_base_seconds: float,
        retry_max_seconds: float,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers=headers,
            timeout=timeout_seconds,
            transport=transport,
            verify=_tls_verification(self.api_url),
            # Every connection is kept: a new one costs the server more than the request.
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
        )
        # Requests beyond the limit wait here, in order, rather than in httpx's pool, whose
        # bookkeeping grows with every waiting request (a burst of claims is hundreds).
        self._slots = anyio.CapacityLimiter(max_connections)
        self.max_retries = max_retries
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._sleep = sleep
        #: Monotonic time of the last answer of any kind from the server (for readiness).
        self.last_answer_at: float | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    def websocket(self, path: str, **options: Any
                  ) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
        """A WebSocket to the API (`flowhand.api.event_stream`) over this transport's own
        client, so it has the same TLS, proxies and headers as every request."""
        return aconnect_ws(path.lstrip("/"), self._http, **options)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send one logical request, retrying transient failures (up to `retries`, default
        `max_retries`); raise on any other error."""
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        url = path.lstrip("/")
        while True:
            try:
                async with self._slots:
                    response = await self._http.request(method, url, json=json, params=params)
            except httpx.TransportError as exc:
                if attempt >= max_retries:
                    raise APIUnreachable(
                        f"{method} {path}: {type(exc).__name__}: {exc or 'no detail'} "
                        f"(after {attempt + 1} attempts; is PREFECT_API_URL {self.api_url} right?)"
                    ) from exc
                delay = backoff_seconds(attempt, self.retry_base_seconds, self.retry_max_seconds)
                log.debug("api.retry", method=method, path=path, error=type(exc).__name__,
                          attempt=attempt + 1, delay_seconds=round(delay, 3))
                attempt += 1
                await self._sleep(delay)
                continue

            self.last_answer_at = time.monotonic()
            if response.headers.get("Prefect-Maintenance", "").lower() == "true":
                # Prefect's own client waits out maintenance windows without counting tries.
                delay = retry_after_seconds(response) or self.retry_max_seconds
                log.info("api.maintenance", method=method, path=path, delay_seconds=delay)
                await self._sleep(delay)
                continue
            if response.status_code in RETRY_STATUSES:
                if attempt >= max_retries:
                    raise APIUnreachable(
                        f"{method} {path} answered {response.status_code} "
                        f"after {attempt + 1} attempts: {error_detail(response)}"
                    )
                retry_after = retry_after_seconds(response)
                delay = (
                    min(retry_after, 60.0)
                    if retry_after is not None
                    else backoff_seconds(attempt, self.retry_base_seconds, self.retry_max_seconds)
                )
                log.debug("api.retry", method=method, path=path, status=response.status_code,
                          attempt=attempt + 1, delay_seconds=round(delay, 3))
                attempt += 1
                await self._sleep(delay)
                continue
            if response.status_code >= 400:
                raise status_error(method, path, response)
            return response
