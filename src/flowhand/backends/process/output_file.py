"""A run's output file: the `OutputSource` of runs started by flowhand versions that gave each
run a file (`runs/<flow run id>.log`) as stdout and stderr, read after an upgrade until they end.

New runs write into a pipe (`output_pipe`): a file grew without bound and a full disk failed the
run's writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowhand.backends.output import last_nonblank, split_lines

#: How much of the file's end is read for the last lines of a run nobody followed.
TAIL_BYTES = 64 * 1024


class OutputFile:
    """Reads a run's output file from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Bytes of the file already read.
        self.offset = 0

    async def read(self, final: bool) -> bytes:
        # One stat while the file has not grown: the common case of a quiet run.
        try:
            if not final and self.path.stat().st_size <= self.offset:
                return b""
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return b""
        # Only whole lines until the end, so two runs' output never interleaves mid-line.
        cut = len(data) if final else data.rfind(b"\n") + 1
        if cut <= 0:
            return b""
        self.offset += cut
        return data[:cut]

    async def last_lines(self, count: int) -> list[str]:
        return tail_lines(self.path, count)


def tail_lines(path: Path, count: int, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last `count` non-blank lines of a file, reading at most `max_bytes` from its end."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    return last_nonblank(split_lines(data), count)
