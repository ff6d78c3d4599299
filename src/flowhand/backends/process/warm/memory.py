"""How much memory a new warm helper could have: the machine's MemAvailable, and the room left
under every memory limit of flowhand's cgroup (v2, or v1's memory controller) and its
ancestors, whichever is smallest."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: (how /proc/self/cgroup names the hierarchy, its directory, limit file, usage file)
_HIERARCHIES = (
    ("0::", "", "memory.max", "memory.current"),
    (":memory:", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
)


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _room(group: Path, top: Path, limit_file: str, usage_file: str) -> int | None:
    """The least room (limit minus usage) over `group` and its ancestors up to `top`."""
    room: int | None = None
    while group.is_relative_to(top):
        try:
            limit = int((group / limit_file).read_text())
            left = max(0, limit - int((group / usage_file).read_text()))
            room = left if room is None else min(room, left)
        except (OSError, ValueError):  # "max", or no such file at this level: no limit here
            pass
        if group == top:
            break
        group = group.parent
    return room


def _cgroup_room(proc: Path, root: Path) -> int | None:
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for marker, directory, limit_file, usage_file in _HIERARCHIES:
        for line in lines:
            head, found, path = line.partition(marker)
            if found and (marker != "0::" or head == ""):
                top = root / directory if directory else root
                room = _room(top / path.strip("/"), top, limit_file, usage_file)
                if room is not None:
                    rooms.append(room)
    return min(rooms) if rooms else None


def available_bytes(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes a new process could use now; None when no figure can be read."""
    figures = [f for f in (_mem_available(proc), _cgroup_room(proc, cgroup_root))
               if f is not None]
    return min(figures) if figures else None
