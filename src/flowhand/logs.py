"""Structured logging: readable on a terminal, JSON lines otherwise, secrets never included.

Events have stable dotted names (`flow_run.claimed`, `flow_run.crashed`) and carry bound context
(`flow_run_id`, `pool`, `backend`); tests assert on them with `structlog.testing.capture_logs`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SECRET_KEYS = {"api_key", "key", "auth_string", "password", "authorization", "token"}


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A last line of defence: values under secret-looking keys are never rendered."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS and event[key] is not None:
            event[key] = "**********"
    return event


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog once for the process; logs go to stderr, run output to stdout."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # httpx logs every request at INFO; URLs only, but noise in a daemon's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
