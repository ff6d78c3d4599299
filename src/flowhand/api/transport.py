"""Sending one logical request to the Prefect API: headers, TLS, CSRF, limits and retries.

Every request carries the headers Prefect's server expects, and every write the CSRF token of
a protected server (`flowhand.api.csrf`); TLS is set up as Prefect's client does
(`flowhand.api.tls`). Transport errors and the statuses Prefect itself treats as transient are
retried with capped exponential backoff and jitter. A `Retry-After` (a rate limit, a proxy
restarting) holds back every request of the worker until it has passed, without counting as a
try; maintenance windows are waited out the same way. An untrusted certificate is not retried:
it is one line naming the setting to fix. Any other error status becomes the matching
`APIStatusError`.
"""

from __future__ import annotations

import base64
import os
import ssl
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
from flowhand.api.csrf import CsrfTokens, csrf_refused
from flowhand.api.responses import error_detail, status_error
from flowhand.api.retry import RETRY_STATUSES, backoff_seconds, retry_after_seconds
from flowhand.api.tls import (
    TLSSettings,
    certificate_error,
    certificate_problem,
    ssl_context,
)
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


def _tls_verification(api_url: str, tls: TLSSettings) -> ssl.SSLContext | bool:
    """The TLS context of the API's connections, or False when none can be used.

    A plain-HTTP API reached without a proxy never uses TLS (redirects are not followed), so
    it gets none (building one costs some 40 ms of start-up, loading CA files).
    """
    proxied = any(os.environ.get(name) or os.environ.get(name.lower())
                  for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    if not proxied and api_url.lower().startswith("http://"):
        return False
    return ssl_context(tls)


#: Most waits a server's `Retry-After` may impose on one request before it is given up.
MAX_RATE_LIMIT_WAITS = 30
#: Writes sent again after a CSRF refusal (first without a token, then with a stale one); the
#: next refusal is the server's final word, raised as the error it is.
MAX_CSRF_TRIES = 2
#: Longest single wait a `Retry-After` is obeyed for.
MAX_RETRY_AFTER_SECONDS = 60.0


class _Retry(Exception):
    """Internal: try the request again after `delay`; `counted` when it uses up a try."""

    def __init__(self, delay: float, counted: bool, reason: str) -> None:
        self.delay = delay
        self.counted = counted
        self.reason = reason


class APITransport:
    """One HTTP connection pool to the API, and the retry loop around each request.

    `transport` lets tests inject faults with `httpx.MockTransport`; `sleep` lets them skip
    the backoff waits. Callbacks given to `on_wait` are told of every wait before a retry (for a
    metric), with its reason:
    rate_limited, unavailable, maintenance, transport or csrf.
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
        tls: TLSSettings | None = None,
        csrf: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.tls = tls or TLSSettings()
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers=headers,
            timeout=timeout_seconds,
            transport=transport,
            verify=_tls_verification(self.api_url, self.tls),
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
        self.csrf = CsrfTokens(lambda path: self.request("GET", path), enabled=csrf)
        self._wait_listeners: list[Callable[[str], None]] = []
        #: Monotonic time before which no request is sent (a server's `Retry-After`).
        self._hold_until = 0.0
        #: Monotonic time of the last answer of any kind from the server (for readiness).
        self.last_answer_at: float | None = None

    def on_wait(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` before each wait for a retry."""
        self._wait_listeners.append(callback)

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
        attempt = waits = csrf_tries = 0
        while True:
            try:
                return await self._attempt(method, path, json, params, attempt, max_retries,
                                           csrf_tries)
            except _Retry as retry:
                attempt += retry.counted
                csrf_tries += retry.reason == "csrf"
                waits += not retry.counted
                if waits > MAX_RATE_LIMIT_WAITS:
                    raise APIUnreachable(f"{method} {path}: still told to wait after "
                                         f"{waits - 1} waits ({retry.reason})") from None
                log.debug("api.retry", method=method, path=path, reason=retry.reason,
                          attempt=attempt, delay_seconds=round(retry.delay, 3),
                          held_seconds=round(max(0.0, self._hold_until - time.monotonic()), 3))
                for listener in self._wait_listeners:
                    listener(retry.reason)
                if retry.delay > 0:
                    await self._sleep(retry.delay)

    async def _attempt(self, method: str, path: str, json: Any,
                       params: dict[str, Any] | None, attempt: int,
                       max_retries: int, csrf_tries: int) -> httpx.Response:
        """One try: the answer, or _Retry, or the error that ends the request."""
        headers = await self.csrf.headers(method)
        held = self._hold_until - time.monotonic()
        if held > 0:
            await self._sleep(held)
        try:
            async with self._slots:
                response = await self._http.request(method, path.lstrip("/"), json=json,
                                                    params=params, headers=headers)
        except httpx.TransportError as exc:
            problem = certificate_problem(exc)
            if problem is not None:
                raise certificate_error(self.api_url, self.tls, problem) from None
            if attempt >= max_retries:
                raise APIUnreachable(
                    f"{method} {path}: {type(exc).__name__}: {exc or 'no detail'} "
                    f"(after {attempt + 1} attempts; is PREFECT_API_URL {self.api_url} right?)"
                ) from exc
            raise _Retry(self._backoff(attempt), True, "transport") from None
        self.last_answer_at = time.monotonic()
        if csrf_refused(response) and csrf_tries < MAX_CSRF_TRIES and self.csrf.refused(headers):
            raise _Retry(0.0, False, "csrf")
        self._judge(method, path, response, attempt, max_retries)
        return response

    def _judge(self, method: str, path: str, response: httpx.Response, attempt: int,
               max_retries: int) -> None:
        """Nothing for an answer to return; _Retry or the matching error otherwise."""
        retry_after = retry_after_seconds(response)
        if response.headers.get("Prefect-Maintenance", "").lower() == "true":
            # Prefect's own client waits out maintenance windows without counting tries.
            log.info("api.maintenance", method=method, path=path, delay_seconds=retry_after)
            raise _Retry(retry_after or self.retry_max_seconds, False, "maintenance")
        if response.status_code not in RETRY_STATUSES:
            if response.status_code >= 400:
                raise status_error(method, path, response)
            return
        reason = "rate_limited" if response.status_code == 429 else "unavailable"
        if retry_after is not None:
            # Asked to come back later: every request of this worker waits, none counts a try.
            delay = min(retry_after, MAX_RETRY_AFTER_SECONDS)
            self._hold_until = max(self._hold_until, time.monotonic() + delay)
            raise _Retry(0.0, False, reason)  # the hold is waited out before the next try
        if attempt >= max_retries:
            raise APIUnreachable(f"{method} {path} answered {response.status_code} "
                                 f"after {attempt + 1} attempts: {error_detail(response)}")
        raise _Retry(self._backoff(attempt), True, reason)

    def _backoff(self, attempt: int) -> float:
        return backoff_seconds(attempt, self.retry_base_seconds, self.retry_max_seconds)
