"""Prefect's own settings sources, read the way Prefect 3 reads them, without importing Prefect.

A user who ran `prefect cloud login` or `prefect config set PREFECT_API_URL=...` has the API URL
and key in a profile; `prefect worker start` uses them, so flowhand does too. Prefect's sources,
lowest priority first:

1. the active profile: `PREFECT_PROFILE`, else the file's `active`, in the profiles file
   (`PREFECT_PROFILES_PATH`, else `profiles_path` in .env / prefect.toml / pyproject.toml, else
   `$PREFECT_HOME/profiles.toml`, else `~/.prefect/profiles.toml`);
2. `[tool.prefect]` in ./pyproject.toml;
3. ./prefect.toml (tables by setting path: `[api] url = ...` is PREFECT_API_URL);
4. ./.env (`PREFECT_...=value` lines).

The process environment, Prefect's highest source, is flowhand's environment layer and is not
read here. Every setting found is returned by its environment-variable name, as Prefect's worker
hands its settings to the runs it starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowhand.config_layers import read_toml
from flowhand.errors import ConfigError

#: Settings whose value is a table, not a group of settings: passed on as JSON, as Prefect does.
_TABLE_VALUED = {"PREFECT_CLIENT_CUSTOM_HEADERS",
                 "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES"}


@dataclass
class PrefectSettings:
    """The PREFECT_* settings found in Prefect's files, each with where it came from."""

    values: dict[str, str] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: str, origin: str) -> None:
        self.values[name] = value
        self.origins[name] = origin

    def profile_names(self) -> frozenset[str]:
        """The settings whose value is the profile's (no later file overrode it)."""
        return frozenset(n for n, origin in self.origins.items() if origin.startswith("profile "))


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _flatten(table: Mapping[str, Any], prefix: str = "PREFECT") -> dict[str, str]:
    """`{"api": {"url": u}}` -> `{"PREFECT_API_URL": u}`: a setting's path is its name."""
    out: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}_{key}".upper()
        if isinstance(value, dict) and name not in _TABLE_VALUED:
            out.update(_flatten(value, name))
        else:
            out[name] = _env_value(value)
    return out


_DOTENV_LINE = re.compile(
    r"""^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$""")


def _unquote(raw: str, environ: Mapping[str, str]) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1].replace('\\"', '"').replace("\\n", "\n")
    else:
        raw = re.split(r"\s+#", raw, maxsplit=1)[0]
    # python-dotenv expands ${VAR} (and ${VAR:-default}) from the environment.
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}",
                  lambda m: environ.get(m.group(1)) or (m.group(2) or ""), raw)


def read_dotenv(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The `KEY=value` pairs of a .env file, as python-dotenv reads them; {} when absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read .env file: {exc}") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        if match:
            out[match.group(1).upper()] = _unquote(match.group(2), environ)
    return out


def _home(environ: Mapping[str, str]) -> Path | None:
    # Path.home() reads HOME; taking it from `environ` keeps in-process tests hermetic.
    home = environ.get("HOME")
    return Path(home) if home else None


def _expand(path: str, environ: Mapping[str, str]) -> Path:
    home = _home(environ)
    if path.startswith("~") and home is not None:
        path = str(home) + path[1:]
    return Path(path)


def profiles_path(
    environ: Mapping[str, str], dotenv: Mapping[str, str], prefect_toml: Mapping[str, Any],
    pyproject_prefect: Mapping[str, Any],
) -> Path | None:
    """Where Prefect looks for profiles, in Prefect's order; None when there is no home."""
    for candidate in (environ.get("PREFECT_PROFILES_PATH"), dotenv.get("PREFECT_PROFILES_PATH"),
                      prefect_toml.get("profiles_path"), pyproject_prefect.get("profiles_path")):
        if candidate:
            return _expand(str(candidate), environ)
    if environ.get("PREFECT_HOME"):
        return _expand(environ["PREFECT_HOME"], environ) / "profiles.toml"
    home = _home(environ)
    return home / ".prefect" / "profiles.toml" if home else None


def _read_profile(path: Path, environ: Mapping[str, str], into: PrefectSettings) -> None:
    data = read_toml(path, "Prefect profiles", missing_ok=True)
    if not data:
        return
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: 'profiles' must be a table of profiles")
    chosen = environ.get("PREFECT_PROFILE")
    if chosen and chosen not in profiles:
        names = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"PREFECT_PROFILE={chosen!r}: no such profile in {path} "
                          f"(profiles there: {names}); unset it or create it with "
                          f"`prefect profile create {chosen}`")
    name = chosen or data.get("active")
    # An `active` that names no profile is ignored, as Prefect ignores it.
    if not isinstance(name, str) or not isinstance(profiles.get(name), dict):
        return
    for key, value in profiles[name].items():
        if key.upper().startswith("PREFECT_") and value is not None:
            into.set(key.upper(), _env_value(value), f"profile {name!r} in {path}")


def read_prefect_settings(
    environ: Mapping[str, str], cwd: Path | None = None
) -> PrefectSettings:
    """Every PREFECT_* setting in Prefect's files, later sources winning; ConfigError when one
    of them cannot be read or names a profile that does not exist."""
    cwd = cwd or Path.cwd()
    dotenv = read_dotenv(cwd / ".env", environ)
    prefect_toml = read_toml(cwd / "prefect.toml", "Prefect settings", missing_ok=True)
    pyproject = read_toml(cwd / "pyproject.toml", "pyproject.toml", missing_ok=True)
    tool = pyproject.get("tool", {})
    pyproject_prefect = tool.get("prefect", {}) if isinstance(tool, dict) else {}
    if not isinstance(pyproject_prefect, dict):
        pyproject_prefect = {}
    found = PrefectSettings()
    path = profiles_path(environ, dotenv, prefect_toml, pyproject_prefect)
    if path is not None:
        _read_profile(path, environ, found)
    for name, value in _flatten(pyproject_prefect).items():
        found.set(name, value, f"{cwd / 'pyproject.toml'} [tool.prefect]")
    for name, value in _flatten(prefect_toml).items():
        found.set(name, value, str(cwd / "prefect.toml"))
    for name, value in dotenv.items():
        if name.startswith("PREFECT_"):
            found.set(name, value, str(cwd / ".env"))
    return found
