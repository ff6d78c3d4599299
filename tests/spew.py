"""A chatty job command for output tests: prints a lot, then becomes the stand-in engine.

    spew.py [--mb N] [--started FILE] [--go FILE] [--progress FILE] [ENGINE ARGS...]

Touches `--started` once running, waits for `--go` to exist, prints N MB of numbered lines
(64 bytes each) while writing how many MB it has printed to `--progress` after each one, then
execs tests/engine.py with the remaining arguments, which reports RUNNING and a final state.
Any print that fails (ENOSPC, EPIPE) ends it with a traceback and a non-zero status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ENGINE = Path(__file__).resolve().parent / "engine.py"
LINE = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--started")
    parser.add_argument("--go")
    parser.add_argument("--progress")
    args, engine_args = parser.parse_known_args()
    if args.started:
        Path(args.started).touch()
    while args.go and not os.path.exists(args.go):
        time.sleep(0.05)
    out = sys.stdout.buffer
    lines_per_mb = (1 << 20) // LINE
    for mb in range(int(args.mb)):
        block = b"".join(b"%06d:%08d %s\n" % (mb, i, b"x" * (LINE - 17))
                         for i in range(lines_per_mb))
        out.write(block)
        out.flush()
        if args.progress:
            Path(args.progress).write_text(str(mb + 1))
    out.write(b"spew done\n")
    out.flush()
    os.execv(sys.executable, [sys.executable, str(ENGINE), *engine_args])


if __name__ == "__main__":
    main()
