"""`flowhand config`: the effective configuration, each value with where it came from.

Secrets (SecretStr keys, and PREFECT_* settings whose name says key, secret, password, token or
auth) are shown as `********`, so the output can be pasted into an issue.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, SecretStr

from flowhand.backends import available_backends, load_backend
from flowhand.config import Config, backend_settings
from flowhand.errors import ConfigError

MASK = "********"
_SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|AUTH|CREDENTIAL", re.IGNORECASE)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def rows(config: Config) -> list[dict[str, Any]]:
    """One row per key (`api.url`), then one per PREFECT_* setting passed on to runs."""
    sources = config.sources()
    out: list[dict[str, Any]] = []

    def add(model: BaseModel, prefix: tuple[str, ...]) -> None:
        for key in type(model).model_fields:
            value = getattr(model, key)
            path = (*prefix, key)
            if isinstance(value, BaseModel) and not prefix:
                add(value, path)
                continue
            source = sources.get(path) or (sources.get(path[:1]) if prefix else None)
            out.append({"key": ".".join(path), "value": _plain(value),
                        "source": source or "default"})

    add(config, ())
    for section, settings in backend_tables(config):
        add(settings, (section,))
    origins = config.prefect_environment_sources()
    for name, value in sorted(config.prefect_environment().items()):
        out.append({"key": f"runs' environment: {name}",
                    "value": MASK if _SECRET_NAME.search(name) else value,
                    "source": origins.get(name, "Prefect settings")})
    return out


def backend_tables(config: Config) -> list[tuple[str, BaseModel]]:
    """Every backend's settings (`[subprocess]`, `[docker]`, a plug-in's), defaults included, so
    that e.g. warm starts can be checked; a backend that cannot be loaded here is left out."""
    out: list[tuple[str, BaseModel]] = []
    for name in available_backends():
        try:
            backend = load_backend(name)
        except ConfigError:
            continue
        if backend.settings_section and backend.settings_section not in dict(out):
            out.append((backend.settings_section, backend_settings(backend, config)))
    return out


def render(config: Config, as_json: bool = False) -> str:
    table = rows(config)
    if as_json:
        return json.dumps(table, indent=2)
    width = max(len(r["key"]) for r in table)
    values = [json.dumps(r["value"]) for r in table]
    value_width = min(40, max(len(v) for v in values))
    return "\n".join(f"{row['key'].ljust(width)}  {value.ljust(value_width)}  {row['source']}"
                     for row, value in zip(table, values, strict=True))
