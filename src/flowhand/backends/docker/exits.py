"""How a container ended: from its `die` event, or from `inspect` when the event is not enough."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from flowhand.backends.docker.daemon import Daemon
from flowhand.backends.docker.errors import DOCKER_ERRORS, explain
from flowhand.backends.docker.events import Seen
from flowhand.backends.docker.streams import NotFound

log: FilteringBoundLogger = structlog.get_logger("flowhand.backends.docker")

#: Even with the event stream healthy, each waiting task re-inspects its container this often:
#: a cheap guard against an event stream that silently stopped delivering.
RECHECK_SECONDS = 60.0


@dataclass
class Ended:
    """How a container ended, from `inspect` or, when it is gone, from its events."""

    exit_code: int | None
    oom: bool
    removed: bool = False
    never_started: bool = False


async def inspect(daemon: Daemon, container_id: str) -> dict[str, Any] | None:
    """The container's `inspect`, or None when it does not exist."""
    engine = await daemon.client()
    try:
        return await engine.inspect_container(container_id)
    except NotFound:
        return None


def _from_inspect(info: dict[str, Any] | None, seen: Seen) -> Ended | None:
    """How it ended by `inspect` (with what events said); None while it runs."""
    if info is None:
        return Ended(exit_code=seen.exit_code, oom=seen.oom, removed=True)
    state = info.get("State") or {}
    if state.get("Status") == "created":
        # `wait()` follows started containers only, so this is one found by `reattach` after
        # flowhand died between create and start: it never ran.
        return Ended(exit_code=None, oom=False, never_started=True)
    if state.get("Running"):
        return None
    code = state.get("ExitCode")
    return Ended(
        exit_code=int(code) if code is not None else seen.exit_code,
        oom=bool(state.get("OOMKilled")) or seen.oom,
        removed=state.get("Status") == "removing",
    )


async def wait_ended(daemon: Daemon, container_id: str, started_here: bool = False) -> Ended:
    """How the container ended: from its `die` event, or from `inspect`.

    Inspects are the fallback, not the rule (each is a call to the daemon): a container this
    process started while the event stream was up is not inspected until an event, a
    resubscription or RECHECK_SECONDS says to; one found by `reattach` is inspected at once,
    since it may have died while nobody listened.
    """
    watcher = await daemon.watcher()
    waiter = watcher.register(container_id)
    failures = 0
    look = not (started_here and watcher.subscribed)
    try:
        while True:
            waiter.arm()
            seen = watcher.seen.get(container_id)
            # A kill (137) is inspected all the same: OOMKilled there is the reliable word.
            if seen is not None and seen.died and seen.exit_code not in (None, 137):
                return Ended(exit_code=seen.exit_code, oom=seen.oom)
            if look:
                try:
                    info = await inspect(daemon, container_id)
                    failures = 0
                except DOCKER_ERRORS as exc:  # the daemon may come back: keep watching
                    failures += 1
                    log.warning("docker.inspect_failed", container_id=container_id,
                                error=explain(exc), failures=failures)
                    await anyio.sleep(min(2.0 ** failures, RECHECK_SECONDS))
                    continue
                ended = _from_inspect(info, watcher.seen.get(container_id) or Seen())
                if ended is not None:
                    return ended
            look = True
            with anyio.move_on_after(RECHECK_SECONDS):
                await waiter.changed.wait()
    finally:
        watcher.unregister(waiter)
