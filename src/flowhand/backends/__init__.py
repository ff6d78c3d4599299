"""Infrastructure backends, found by name in the `flowhand.backends` entry point group.

Built-ins: `process` (alias `subprocess`) and `docker`. A backend module is imported only when it
is selected, so the core never imports docker unless the docker backend is used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from flowhand.backends.base import Backend, Exit, Handle, Job, JobConfig
from flowhand.errors import ConfigError

# Used when flowhand runs from a source tree whose entry points are not installed.
_BUILTIN = {
    "process": "flowhand.backends.subprocess:SubprocessBackend",
    "docker": "flowhand.backends.docker:DockerBackend",
}
_ALIASES = {"subprocess": "process"}


def available_backends() -> list[str]:
    names = set(_BUILTIN) | {ep.name for ep in entry_points(group="flowhand.backends")}
    return sorted({_ALIASES.get(n, n) for n in names})


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`; ConfigError when there is none."""
    name = _ALIASES.get(name, name)
    target = None
    for ep in entry_points(group="flowhand.backends"):
        if _ALIASES.get(ep.name, ep.name) == name:
            target = ep.value
            break
    target = target or _BUILTIN.get(name)
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


__all__ = ["Backend", "Exit", "Handle", "Job", "JobConfig", "available_backends", "load_backend"]
