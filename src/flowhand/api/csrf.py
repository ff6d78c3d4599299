"""CSRF tokens as Prefect's client uses them against a server with CSRF protection on.

The client has an id of its own; it asks `GET /csrf-token?client=<id>` and sends the token and
the id as `Prefect-Csrf-Token` and `Prefect-Csrf-Client` with every write (POST, PUT, PATCH,
DELETE). Prefect's client asks before its first write; flowhand asks when a server first
refuses a write for want of a token ("Missing CSRF token", answered before the write is looked
at, so sending it again is safe): most servers have no CSRF protection, and they are never
asked. A new token is asked for before the old one expires, and when the server no longer knows
it (a restarted server, tokens cleaned up). A server answering the token request with 404 or
422 "CSRF protection is disabled." is not asked again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta

import anyio
import httpx

from flowhand.clock import utcnow
from flowhand.errors import APIStatusError

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: A token is renewed this long before the expiry the server gave, so no write carries a token
#: that expires on the way.
_EXPIRY_MARGIN = timedelta(seconds=30)


def csrf_refused(response: httpx.Response) -> bool:
    """Whether a 403 is the CSRF middleware's (missing, invalid or unknown token)."""
    return response.status_code == 403 and "CSRF token" in response.text


class CsrfTokens:
    """The token of one client: `headers` for a request, `refused` when the server said no."""

    def __init__(self, fetch: Callable[[str], Awaitable[httpx.Response]],
                 enabled: bool = True) -> None:
        """`fetch(path)` GETs a path of the API (with the transport's retries)."""
        self.enabled = enabled
        self.client_id = str(uuid.uuid4())
        self._fetch = fetch
        #: Set by the first refusal: from then on every write carries a token.
        self._needed = False
        self._token: str | None = None
        self._expires: datetime | None = None
        self._lock = anyio.Lock()

    def _valid(self) -> bool:
        if self._token is None:
            return False
        return self._expires is None or utcnow() + _EXPIRY_MARGIN < self._expires

    async def headers(self, method: str) -> dict[str, str]:
        """The CSRF headers for a request; none for reads or a server without protection."""
        if not (self.enabled and self._needed) or method.upper() not in WRITE_METHODS:
            return {}
        if not self._valid():
            # One fetch for a burst of writes: the others wait for it.
            async with self._lock:
                if not self._valid():
                    await self._renew()
        if not self.enabled or self._token is None:
            return {}
        return {"Prefect-Csrf-Token": self._token, "Prefect-Csrf-Client": self.client_id}

    def refused(self, sent: Mapping[str, str]) -> bool:
        """The server refused a write that carried `sent` for CSRF: whether sending it again
        can help (with a token; a new one if the server no longer knows the one sent)."""
        if not self.enabled:
            return False
        self._needed = True
        if sent.get("Prefect-Csrf-Token") == self._token:
            self._token = None  # expired, or a restarted server forgot it (others renewed)
        return True

    async def _renew(self) -> None:
        try:
            response = await self._fetch(f"/csrf-token?client={self.client_id}")
        except APIStatusError as exc:
            if exc.status_code == 404 or (exc.status_code == 422 and "disabled" in exc.detail):
                self.enabled = False
                return
            raise
        body = response.json()
        self._token = str(body["token"])
        expiration = body.get("expiration")
        self._expires = datetime.fromisoformat(expiration) if expiration else None
        if self._expires is not None and self._expires.tzinfo is None:
            self._expires = self._expires.replace(tzinfo=UTC)
