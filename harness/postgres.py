"""A private PostgreSQL cluster for a Prefect server under load (the fleet tests, the bench).

SQLite serialises every write; several workers racing for hundreds of runs need the database
Prefect recommends for production. Debian's `postgresql` package provides the binaries.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness.prefect_server import free_port


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise RuntimeError("PostgreSQL not found under /usr/lib/postgresql: run scripts/test or "
                           "bench/run, which install Debian's postgresql package")
    return found[-1].parent


class Postgres:
    """A private cluster under a temporary directory, on a free loopback port, trust auth.

    Durability is off (fsync, synchronous_commit, full_page_writes): the database is thrown away
    after the run (a benchmark, a test module).
    """

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="flowhand-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.started = False
        self.as_root = os.geteuid() == 0
        if self.as_root:  # initdb refuses to run as root: the cluster belongs to `postgres`
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/prefect"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, cwd=self.dir,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "prefect", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        options = " ".join([
            f"-c port={self.port}", "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.dir}", "-c max_connections=300",
            "-c shared_buffers=256MB", "-c fsync=off", "-c synchronous_commit=off",
            "-c full_page_writes=off",
        ])
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w",
                  "-t", "60", "-o", options, "start")
        self.started = True
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", "prefect")

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
