"""Structured logging: readable on a terminal, JSON lines otherwise, secrets never included.

Events have stable dotted names (`flow_run.claimed`, `flow_run.crashed`) and carry bound context
(`flow_run_id`, `pool`, `backend`); tests assert on them with `structlog.testing.capture_logs`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SECRET_KEYS = {"api_key", "key", "auth_string", "password", "authorization", "token"}


#: The logger of the run the current task works for, bound once with the run's identity
#: (`flow_run_id`, `flow_run_name`): parts that write about a run log through it rather than
#: take a logger parameter. A context variable of the bound logger (not structlog's
#: `merge_contextvars`) so the fields are there under `structlog.testing.capture_logs` too.
_RUN_LOG: ContextVar[FilteringBoundLogger | None] = ContextVar("flowhand_run_log", default=None)


@contextmanager
def run_logging(log: FilteringBoundLogger) -> Iterator[None]:
    """Within this block (and tasks started from it), `run_log` is `log`."""
    token = _RUN_LOG.set(log)
    try:
        yield
    finally:
        _RUN_LOG.reset(token)


def run_log(default: FilteringBoundLogger) -> FilteringBoundLogger:
    """The current run's logger, or `default` outside any run."""
    return _RUN_LOG.get() or default


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
