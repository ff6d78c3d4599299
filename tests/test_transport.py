"""The transport's protocol details, fast, with `httpx.MockTransport` standing in for the server:
CSRF tokens as Prefect's client handles them, and `Retry-After` holding back the worker.
(The same behaviours against real servers and proxies: tests/test_api_edges.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from flowhand.api.transport import APITransport
from flowhand.errors import AuthError


def _transport(handler: httpx.MockTransport, sleeps: list[float] | None = None,
               max_retries: int = 2) -> APITransport:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return APITransport("http://api.test/api", headers={}, timeout_seconds=5,
                        max_retries=max_retries, max_connections=4, retry_base_seconds=0.01,
                        retry_max_seconds=0.02, transport=handler, sleep=sleep)


class CsrfServer:
    """Answers like Prefect's CSRF middleware; `forget()` is a restart that lost the tokens."""

    def __init__(self, expires_in: float = 3600) -> None:
        self.tokens: dict[str, str] = {}
        self.token_requests = 0
        self.expires_in = expires_in

    def forget(self) -> None:
        self.tokens.clear()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            self.token_requests += 1
            client = request.url.params["client"]
            self.tokens[client] = f"token-{self.token_requests}"
            expiry = datetime.now(UTC) + timedelta(seconds=self.expires_in)
            return httpx.Response(200, json={"token": self.tokens[client], "client": client,
                                             "expiration": expiry.isoformat()})
        if request.method in ("POST", "PATCH", "PUT", "DELETE"):
            token = request.headers.get("Prefect-Csrf-Token")
            client = request.headers.get("Prefect-Csrf-Client")
            if not token or not client:
                return httpx.Response(403, json={"detail": "Missing CSRF token."})
            if self.tokens.get(client) != token:
                return httpx.Response(
                    403, json={"detail": "Invalid CSRF token or client identifier."})
        else:
            assert "Prefect-Csrf-Token" not in request.headers
        return httpx.Response(200, json={"ok": True})


def test_csrf_token_fetched_once_for_a_burst_and_renewed_after_a_restart() -> None:
    """Ten concurrent writes refused for want of a token share one fetched token; after the
    server forgets it, the next write is refused once, a new token is fetched and the write
    goes through; reads carry none."""
    server = CsrfServer()
    transport = _transport(httpx.MockTransport(server))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(lambda: transport.request("POST", "/flow_runs/x/set_state",
                                                        json={}))
        await transport.request("GET", "/health")
        assert server.token_requests == 1
        server.forget()
        assert (await transport.request("POST", "/logs/", json=[])).status_code == 200
        assert server.token_requests == 2
        await transport.aclose()

    anyio.run(main)


def test_csrf_token_renewed_before_it_expires() -> None:
    """A token that expires within the safety margin is renewed before the write, not after
    a refusal."""
    server = CsrfServer(expires_in=5)
    transport = _transport(httpx.MockTransport(server))

    async def main() -> None:
        await transport.request("POST", "/a", json={})
        await transport.request("POST", "/b", json={})
        assert server.token_requests == 2
        await transport.aclose()

    anyio.run(main)


def test_server_without_csrf_protection_is_never_asked() -> None:
    """A server that refuses no write is never asked for a token, and no write carries one."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            asked.append(request.url.path)
        assert "Prefect-Csrf-Token" not in request.headers
        return httpx.Response(200, json={})

    transport = _transport(httpx.MockTransport(handler))

    async def main() -> None:
        for _ in range(3):
            await transport.request("POST", "/x", json={})
        await transport.aclose()

    anyio.run(main)
    assert asked == []


def test_a_csrf_refusal_that_persists_is_raised_with_the_servers_words() -> None:
    """A server that refuses every token ends in AuthError quoting it, after the retries."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            return httpx.Response(200, json={"token": "t", "expiration": None})
        return httpx.Response(403, json={"detail": "Invalid CSRF token or client identifier."})

    transport = _transport(httpx.MockTransport(handler))

    async def main() -> None:
        with pytest.raises(AuthError, match="Invalid CSRF token"):
            await transport.request("POST", "/x", json={})
        await transport.aclose()

    anyio.run(main)


def test_retry_after_is_obeyed_without_using_up_tries_and_counted() -> None:
    """429 with Retry-After: 1 three times in a row, with max_retries=0: the request still
    succeeds after three waits of 1 s, each reported to on_wait."""
    answers = [httpx.Response(429, headers={"Retry-After": "1"})] * 3 + [
        httpx.Response(200, json={})]
    sleeps: list[float] = []
    waits: list[str] = []
    transport = _transport(httpx.MockTransport(lambda request: answers.pop(0)), sleeps,
                           max_retries=0)
    transport.on_wait(waits.append)

    async def main() -> None:
        response = await transport.request("GET", "/work_pools/p")
        assert json.loads(response.content) == {}
        await transport.aclose()

    anyio.run(main)
    assert waits == ["rate_limited"] * 3
    assert [round(s) for s in sleeps if s >= 0.5] == [1, 1, 1]
