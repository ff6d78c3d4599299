"""SIGTERM/SIGINT counted before the event loop listens (shared by the console script and `start`).

Kept apart from `entry` so that `service` and `cli` can name it without importing the console
script, which itself imports `cli`. It imports nothing heavy.
"""

from __future__ import annotations

import signal
from types import FrameType


class EarlySignals:
    """Counts SIGTERM/SIGINT that arrive before the event loop listens for them."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> EarlySignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Python's own handling again (for commands that are not services)."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count >= 2:
            raise SystemExit(130)
