"""Infrastructure backends, found by name in the `flowhand.backends` entry point group.

Built-ins: `process` (alias `subprocess`), `docker` and `kubernetes`. A backend module is
imported only when it is selected or its settings table is in the configuration, so the core
never imports docker (or lightkube) unless that backend is used or configured.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from flowhand.backends.base import Backend
from flowhand.errors import ConfigError

# Used when flowhand runs from a source tree whose entry points are not installed.
_BUILTIN = {
    "process": "flowhand.backends.process:ProcessBackend",
    "docker": "flowhand.backends.docker:DockerBackend",
    "kubernetes": "flowhand.backends.kubernetes:KubernetesBackend",
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
        hint = f" (install flowhand[{name}])" if name in ("docker", "kubernetes") else ""
        raise ConfigError(f"backend {name!r} cannot be loaded: {exc}{hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend {name!r} ({target}) is not a flowhand Backend")
    return cls


def section_names() -> list[str]:
    """The tables backends are expected to use, without importing any: each backend's name, or
    the alias it is known by (`subprocess`), for messages that list what is allowed."""
    alias_of = {name: alias for alias, name in _ALIASES.items()}
    return sorted(alias_of.get(name, name) for name in _registered())


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
    named = _ALIASES.get(section, section)
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
    "load_backend",
    "section_names",
]
