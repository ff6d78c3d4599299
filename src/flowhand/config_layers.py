"""Layers of configuration as plain nested dicts: read a TOML file, merge layers, list the key
paths a layer sets (to say where a value came from), drop unset command-line values."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowhand.errors import ConfigError


def set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value

def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, tables merged key by key (Prefect merges job variables so too)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out

def key_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping) and not prefix:
            out.extend(key_paths(value, (key,)))
        out.append(prefix + (key,))
    return out

def read_toml(path: Path, what: str = "configuration file", missing_ok: bool = False
              ) -> dict[str, Any]:
    """A TOML file as a dict; a missing file is {} when `missing_ok`, else one clear error."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML in {what}: {exc}") from None


def drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out
