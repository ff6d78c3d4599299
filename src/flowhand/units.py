"""Units in operator-written values that more than one module reads (configuration, policy)."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(value: Any) -> int:
    """Docker's memory notation: 512m, 2g, 1024k, or a number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)b?\s*", str(value).lower())
    if not match:
        raise ValueError(f"not a memory size: {value!r} (use e.g. 512m or 2g)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
