"""When to try a request again, and how long to wait first.

`backoff_seconds` is also the pause of every other loop that retries the API (polling,
start-up, state delivery), so they all spread out the same way.
"""

from __future__ import annotations

import email.utils
import random

import httpx

from flowhand.clock import utcnow

#: Statuses that mean "try again later": request timeout, rate limit, bad gateway, unavailable
#: (SQLite's "database is locked" arrives as 503), gateway timeout.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries spread out."""
    delay = min(cap, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The server's `Retry-After` (seconds or an HTTP date) as seconds from now, if it sent one."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - utcnow()).total_seconds())
