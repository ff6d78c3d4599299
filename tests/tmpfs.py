"""Small real filesystems for tests: a tmpfs of a given size, read-only if asked, unmounted
afterwards. Needs root (tests and CI run as root); elsewhere the test is skipped (failed in CI)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.prefect_env import skip_or_fail


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m", read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` (made if missing); read-only after `prepare` when
    `read_only` (remount it with `remount_read_only`)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process the test left behind must not keep the mount (or fail the teardown).
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def used_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def fill(path: Path) -> Path:
    """Write a file until the filesystem is full; the file."""
    filler = path / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(block)
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 4096)
    return filler
