"""Infrastructure backends, found by name in the `flowhand.backends` entry point group.

Built-ins: `process` (alias `subprocess`, its former name, also for its settings: `[subprocess]`
and `FLOWHAND_SUBPROCESS__*` read as `[process]`) and `docker`. A backend module is imported only
when it is selected or its settings table is in the configuration, so the core never imports
docker unless the docker backend is used or configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Container, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from flowhand.backends.base import Backend
from flowhand.config_layers import merge
from flowhand.errors import ConfigError

# Used when flowhand runs from a source tree whose entry points are not installed.
_BUILTIN = {
    "process": "flowhand.backends.process:ProcessBackend",
    "docker": "flowhand.backends.docker:DockerBackend",
}
_ALIASES = {"subprocess": "process"}


def _registered() -> dict[str, str]:
    """Backend name → "module:attribute", entry points over built-ins."""
    found = dict(_BUILTIN)
    for ep in entry_points(group="flowhand.backends"):
        found[_ALIASES.get(ep.name, ep.name)] = ep.value
    return found


def available_backends() -> list[str]:
    return sorted(_registered())


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`; ConfigError when there is none."""
    name = _ALIASES.get(name, name)
    target = _registered().get(name)
    if target is None:
        raise ConfigError(
            f"unknown backend type {name!r} (available: {', '.join(available_backends())})"
        )
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        hint = " (install flowhand[docker])" if name == "docker" else ""
        raise ConfigError(f"backend {name!r} cannot be loaded: {exc}{hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend {name!r} ({target}) is not a flowhand Backend")
    return cls


def section_names() -> list[str]:
    """The tables backends are expected to use, without importing any: each backend's name, for
    messages that list what is allowed."""
    return sorted(_registered())


def canonical_section(section: str) -> str:
    """The table a backend reads for `section`: a former name (`subprocess`) is its backend's."""
    return _ALIASES.get(section, section)


def canonical_tables(layer: Mapping[str, Any], core: Container[str]) -> dict[str, Any]:
    """One configuration layer with backend tables under their current names (`[subprocess]`
    read as `[process]`; `core` names the core's own keys); where a layer has both names, the
    current one's keys win."""
    out = {key: value for key, value in layer.items()
           if key in core or canonical_section(key) == key}
    for key, value in layer.items():
        name = canonical_section(key)
        if key in out:
            continue
        current = out.get(name)
        out[name] = (merge(value, current) if isinstance(value, Mapping)
                     and isinstance(current, Mapping) else value if current is None else current)
    return out


def canonical_variable(var: str) -> str:
    """`FLOWHAND_SUBPROCESS__KEY` as `FLOWHAND_PROCESS__KEY`; other names unchanged."""
    section, sep, key = var.removeprefix("FLOWHAND_").partition("__")
    if not var.startswith("FLOWHAND_") or not sep:
        return var
    return f"FLOWHAND_{canonical_section(section.lower()).upper()}__{key}"


@dataclass(frozen=True)
class SectionOwner:
    """The backend a configuration table belongs to."""

    name: str
    #: None when the backend is registered under the table's name but cannot be imported here
    #: (docker-py not installed): its table is checked when, and if, the backend is selected.
    backend: type[Backend] | None


def backend_for_section(section: str) -> SectionOwner | None:
    """The backend whose `settings_section` is `section`, or None when no backend claims it.

    The backend registered under that name (or alias) is tried first, so a configuration with
    a `[docker]` table imports the docker backend and no other; only a table no backend is
    named after makes every registered backend load, to ask each.
    """
    named = section = canonical_section(section)
    registered = _registered()
    if named in registered:
        try:
            cls = load_backend(named)
        except ConfigError:
            return SectionOwner(named, None)
        if cls.settings_section == section:
            return SectionOwner(named, cls)
    for name in sorted(registered.keys() - {named}):
        try:
            cls = load_backend(name)
        except ConfigError:
            continue
        if cls.settings_section == section:
            return SectionOwner(name, cls)
    return None


__all__ = [
    "SectionOwner",
    "available_backends",
    "backend_for_section",
    "canonical_section",
    "canonical_tables",
    "canonical_variable",
    "load_backend",
    "section_names",
]
