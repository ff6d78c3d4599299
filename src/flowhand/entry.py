"""The `flowhand` console script, and the signals that arrive while it is still importing.

Importing flowhand (pydantic, anyio, structlog, httpx) takes a few hundred milliseconds; a
SIGTERM from a supervisor in that time would otherwise kill the process with no word, and a
SIGINT print a traceback. So this module, which imports nothing heavy, counts them first; the
command then treats them as a stop during start-up (a second one forces exit 130 at once).
"""

from __future__ import annotations

import sys

from flowhand.early_signals import EarlySignals


def main() -> int:
    early = EarlySignals().install()
    from flowhand.cli import main as cli_main

    return cli_main(sys.argv[1:], early=early)
