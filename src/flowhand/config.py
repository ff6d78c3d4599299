"""Configuration: one pydantic model, read from TOML, then environment, then command line.

Precedence, lowest first: defaults, the TOML file (`--config`, else `$FLOWHAND_CONFIG`, else
`./worker.toml` when present), environment variables, command-line flags. Every key in the model is
documented with its default in `worker.toml.example`.

Environment variables: `PREFECT_API_URL`, `PREFECT_API_KEY` and `PREFECT_API_AUTH_STRING` set the
`[api]` keys, as they do for Prefect itself; `FLOWHAND_<KEY>` sets a top-level key and
`FLOWHAND_<SECTION>__<KEY>` a key in a section (`FLOWHAND_API__TIMEOUT_SECONDS=10`). Lists are
comma-separated.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from flowhand.errors import ConfigError

DEFAULT_CONFIG_FILE = "worker.toml"


def _default_state_dir() -> Path:
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return Path(base) / "flowhand"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class APIConfig(_Section):
    url: str = Field("http://127.0.0.1:4200/api", description="Prefect API URL")
    key: SecretStr | None = Field(None, description="API key, sent as a Bearer token")
    auth_string: SecretStr | None = Field(None, description="'user:password' for Basic auth")
    timeout_seconds: float = Field(30.0, gt=0)
    max_retries: int = Field(5, ge=0)
    max_connections: int = Field(16, ge=1, le=1000)
    retry_base_seconds: float = Field(0.5, gt=0)
    retry_max_seconds: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://127.0.0.1:4200/api")
        return value.rstrip("/")


class LoggingConfig(_Section):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SubprocessConfig(_Section):
    kill_grace_seconds: float = Field(30.0, ge=0)
    crash_log_lines: int = Field(20, ge=0)
    #: The Python of the Prefect installation that runs flows (`-m prefect.engine`); default:
    #: the interpreter of the `prefect` on the run's PATH.
    python: str | None = None


class DockerConfig(_Section):
    base_url: str | None = Field(None, description="Docker daemon URL; default from DOCKER_HOST")
    api_url_rewrite: Literal["auto", "never"] | str = Field(
        "auto",
        description="How the container reaches the API: 'auto' as Prefect does, 'never', or a "
        "hostname that replaces localhost/127.0.0.1 in PREFECT_API_URL",
    )
    kill_grace_seconds: float = Field(30.0, ge=0)
    crash_log_lines: int = Field(20, ge=0)
    api_threads: int = Field(
        8, ge=1, le=64, description="Most threads making blocking Docker calls at once"
    )
    timeout_seconds: float = Field(60.0, gt=0, description="Timeout of one Docker API call")

    @field_validator("api_url_rewrite")
    @classmethod
    def _rewrite_target(cls, value: str) -> str:
        if value in ("auto", "never"):
            return value
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError("must be 'auto', 'never' or a hostname, e.g. host.docker.internal")
        return value


class PolicyConfig(_Section):
    deny: list[str] = Field(default_factory=list)
    allow: dict[str, list[Any]] = Field(default_factory=dict)
    image_prefixes: list[str] = Field(default_factory=list)
    volume_sources: list[str] = Field(default_factory=list)
    max_mem_limit: str | None = None

    @field_validator("max_mem_limit")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value:
            from flowhand.policy import parse_bytes  # policy imports this module

            parse_bytes(value)
        return value or None


class RunLogsConfig(_Section):
    forward_output: bool = False
    max_output_bytes: int = Field(1_000_000, ge=0)


class HTTPConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class RetryCrashedConfig(_Section):
    max_retries: int = Field(0, ge=0, description="retries of crashed runs (0: only the flow's)")
    delay_seconds: float = Field(10.0, ge=0)


class ShutdownConfig(_Section):
    mode: Literal["drain", "detach", "reschedule"] = "drain"
    grace_seconds: float = Field(300.0, ge=0)
    after_grace: Literal["detach", "reschedule"] = "detach"


class Config(_Section):
    pool: str | None = None
    work_queues: list[str] = Field(default_factory=list)
    name: str = Field(default_factory=lambda: f"flowhand-{socket.gethostname()}")
    type: str | None = None
    limit: int | None = Field(None, ge=1)
    poll_interval_seconds: float = Field(2.0, gt=0)
    prefetch_seconds: float = Field(10.0, ge=0)
    heartbeat_interval_seconds: float = Field(30.0, gt=0)
    max_late_seconds: float | None = Field(None, gt=0)
    create_pool: bool = True
    watch_interval_seconds: float = Field(2.0, gt=0)
    reconcile_interval_seconds: float = Field(60.0, gt=0)
    max_run_seconds: float | None = Field(None, gt=0)
    state_dir: Path = Field(default_factory=_default_state_dir)
    api: APIConfig = Field(default_factory=APIConfig)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    subprocess: SubprocessConfig = Field(default_factory=SubprocessConfig)  # type: ignore[arg-type]
    docker: DockerConfig = Field(default_factory=DockerConfig)  # type: ignore[arg-type]
    retry_crashed: RetryCrashedConfig = Field(default_factory=RetryCrashedConfig)  # type: ignore[arg-type]
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)  # type: ignore[arg-type]
    http: HTTPConfig = Field(default_factory=HTTPConfig)  # type: ignore[arg-type]
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    run_logs: RunLogsConfig = Field(default_factory=RunLogsConfig)  # type: ignore[arg-type]

    @field_validator("name")
    @classmethod
    def _worker_name(cls, value: str) -> str:
        if not value or "/" in value or "%" in value:
            raise ValueError("must be non-empty and contain neither '/' nor '%'")
        return value

    @field_validator("type")
    @classmethod
    def _backend_alias(cls, value: str | None) -> str | None:
        # "subprocess" is what the backend is called; "process" is the pool type Prefect uses.
        return "process" if value == "subprocess" else value


_ENV_ALIASES = {
    "PREFECT_API_URL": ("api", "url"),
    "PREFECT_API_KEY": ("api", "key"),
    "PREFECT_API_AUTH_STRING": ("api", "auth_string"),
}
# Variables that belong to the CLI rather than the model, and those of flowhand's own scripts
# (scripts/bootstrap.sh, bench/run: where their Prefect tool environments are), which a worker
# started from a developer's shell inherits.
_ENV_RESERVED = {"FLOWHAND_CONFIG", "FLOWHAND_PREFECT_ENV", "FLOWHAND_PREFECT_391_ENV",
                 "FLOWHAND_BENCH_ENV"}


def _sections() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for key, field in Config.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[key] = ann
    return out


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    sections = _sections()
    for var, value in environ.items():
        path: tuple[str, ...]
        if var in _ENV_ALIASES:
            path = _ENV_ALIASES[var]
        elif var.startswith("FLOWHAND_") and var not in _ENV_RESERVED:
            parts = var[len("FLOWHAND_"):].lower().split("__")
            path = tuple(parts)
            known = (
                (len(path) == 1 and path[0] in Config.model_fields and path[0] not in sections)
                or (len(path) == 2 and path[0] in sections
                    and path[1] in sections[path[0]].model_fields)
            )
            if not known:
                raise ConfigError(
                    f"environment variable {var}: unknown setting "
                    f"(use FLOWHAND_<KEY> or FLOWHAND_<SECTION>__<KEY>; see worker.toml.example)"
                )
        else:
            continue
        parsed: Any = value
        if path == ("work_queues",):
            parsed = [q.strip() for q in value.split(",") if q.strip()]
        _set(data, path, parsed)
        origins[path] = f"environment variable {var}"
    return data, origins


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping) and not prefix:
            out.extend(_paths(value, (key,)))
        out.append(prefix + (key,))
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def config_file_path(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: `--config`, else `$FLOWHAND_CONFIG`, else `./worker.toml` if present."""
    if cli_path:
        return Path(cli_path)
    if environ.get("FLOWHAND_CONFIG"):
        return Path(environ["FLOWHAND_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_config(
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from file, environment and CLI overrides (a nested dict).

    Raises ConfigError with a message naming the source (file, variable or flag), the key and what
    was expected.
    """
    environ = os.environ if environ is None else environ
    path = config_file_path(config_path, environ)
    file_data = _read_toml(path) if path else {}
    origins: dict[tuple[str, ...], str] = {p: str(path) for p in _paths(file_data)}
    env_data, env_origins = _env_layer(environ)
    origins.update(env_origins)
    cli_data = {k: v for k, v in (overrides or {}).items() if v is not None}
    for p in _paths(cli_data):
        origins[p] = "command line"
    data = _merge(_merge(file_data, env_data), cli_data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, path)) from None


def _describe(
    exc: ValidationError, origins: Mapping[tuple[str, ...], str], path: Path | None
) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        origin = origins.get(loc) or origins.get(loc[:1]) or (str(path) if path else "defaults")
        if err["type"] == "extra_forbidden":
            model: type[BaseModel] = Config
            if len(loc) > 1 and loc[0] in _sections():
                model = _sections()[loc[0]]
            allowed = ", ".join(sorted(model.model_fields))
            problems.append(f"{origin}: unknown key '{key}' (allowed here: {allowed})")
        else:
            problems.append(
                f"{origin}: key '{key}': {err['msg']} (got {err.get('input')!r})"
                if "input" in err and err["type"] != "missing"
                else f"{origin}: key '{key}': {err['msg']}"
            )
    return "; ".join(problems)
