"""A local record of the runs this worker has claimed, kept until they are reported.

The server knows a run is PENDING, but not who claimed it until the worker labels it, nor where
its infrastructure is until `infrastructure_pid` is recorded. A worker killed between those steps
would lose track. The journal is written before the claim is proposed and updated as soon as the
infrastructure exists, so a restarted worker can tell "claimed, never started" (hand it back)
from "started" (re-attach or report) for every run it may own. Each worker has its own journal
directory (see `state_dir`), so workers sharing a `state_dir` never touch each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from flowhand.state_dir import make_private_dir, open_private

log = structlog.get_logger("flowhand.journal")


@dataclass
class Entry:
    flow_run_id: str
    transition_id: str
    infrastructure_pid: str | None = None


class Journal:
    """One small JSON file per run in `directory`, replaced atomically, private (0600)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _path(self, flow_run_id: uuid.UUID | str) -> Path:
        return self.dir / f"{flow_run_id}.json"

    def _write(self, entry: Entry) -> None:
        make_private_dir(self.dir)
        path = self._path(entry.flow_run_id)
        tmp = path.with_suffix(".tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(asdict(entry)))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def claiming(self, flow_run_id: uuid.UUID, transition_id: uuid.UUID) -> None:
        self._write(Entry(str(flow_run_id), str(transition_id)))

    def started(self, flow_run_id: uuid.UUID, infrastructure_pid: str) -> None:
        entry = self.get(flow_run_id) or Entry(str(flow_run_id), "")
        entry.infrastructure_pid = infrastructure_pid
        try:
            self._write(entry)
        except OSError as exc:
            # The run is already running: a full state_dir must not fail it. The server keeps
            # the same record (infrastructure_pid, the worker's label) for recovery.
            log.warning("journal.write_failed", flow_run_id=str(flow_run_id),
                        error=exc.strerror or str(exc))

    def get(self, flow_run_id: uuid.UUID | str) -> Entry | None:
        try:
            return Entry(**json.loads(self._path(flow_run_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def forget(self, flow_run_id: uuid.UUID | str) -> None:
        with contextlib.suppress(OSError):
            self._path(flow_run_id).unlink()

    def entries(self) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.glob("*.json"):
            entry = self.get(path.stem)
            if entry is not None:
                found.append(entry)
        return found
