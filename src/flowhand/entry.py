"""The `flowhand` console script, and the signals that arrive while it is still importing.

Importing flowhand (pydantic, anyio, structlog, httpx) takes a few hundred milliseconds; a
SIGTERM from a supervisor in that time would otherwise kill the process with no word, and a
SIGINT print a traceback. So this module, which imports nothing heavy, counts them first; the
command then treats them as a stop during start-up (a second one forces exit 130 at once).
"""

from __future__ import annotations

import signal
import sys
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


def main() -> int:
    early = EarlySignals().install()
    from flowhand.cli import main as cli_main

    return cli_main(sys.argv[1:], early=early)
