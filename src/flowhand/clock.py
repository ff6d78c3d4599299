"""The time the worker compares with the server's: timezone-aware UTC, like Prefect's."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
