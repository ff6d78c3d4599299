"""Configuration: one pydantic model, read from TOML, then environment, then command line.

Precedence, lowest first: defaults, Prefect's own settings files (profile, pyproject.toml,
prefect.toml, .env: see `flowhand.prefect_settings`), the TOML file (`--config`, else
`$FLOWHAND_CONFIG`, else `./worker.toml` when present), environment variables, command-line flags.
Every key in the model is documented with its default in `worker.toml.example`.

Environment variables: the Prefect settings in `PREFECT_SETTINGS` (`PREFECT_API_URL`,
`PREFECT_API_KEY`, `PREFECT_WORKER_QUERY_SECONDS`, ...) set the keys they name, as they do for
Prefect itself; `FLOWHAND_<KEY>` sets a top-level key and `FLOWHAND_<SECTION>__<KEY>` a key in a
section (`FLOWHAND_API__TIMEOUT_SECONDS=10`), and wins over the Prefect name. Lists are
comma-separated.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from flowhand.backends import (
    backend_for_section,
    canonical_tables,
    canonical_variable,
)
from flowhand.backends.base import Backend, BackendContext
from flowhand.config_layers import drop_none, key_paths, merge, read_toml, set_path
from flowhand.config_problems import model_sections, validation_problems
from flowhand.errors import ConfigError
from flowhand.prefect_settings import PREFECT_SETTINGS, PrefectSettings, prefect_layer
from flowhand.state_dir import worker_dir
from flowhand.units import parse_bytes

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
    ssl_cert_file: str | None = Field(None, description="CA bundle to verify the API with")
    tls_insecure_skip_verify: bool = False
    csrf_support: bool = Field(True, description="send Prefect's CSRF token on writes")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://127.0.0.1:4200/api")
        return value.rstrip("/")


class LoggingConfig(_Section):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


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
            parse_bytes(value)
        return value or None


class RunLogsConfig(_Section):
    forward_output: bool = False
    max_output_bytes: int = Field(1_000_000, ge=0)


class HTTPConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class HealthcheckConfig(_Section):
    """Prefect's worker healthcheck (`--with-healthcheck`): GET /health on its own port."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class RetryCrashedConfig(_Section):
    max_retries: int = Field(0, ge=0, description="retries of crashed runs (0: only the flow's)")
    delay_seconds: float = Field(10.0, ge=0)


class EventStreamConfig(_Section):
    """The server's event stream: a run due on the pool wakes the poller, a cancellation stops
    its run at once; meanwhile polls and cancellation queries are only a safety net."""

    enabled: bool = True
    #: At most 45: the server marks queues NOT_READY after 60 s without a poll.
    poll_interval_seconds: float = Field(30.0, gt=0, le=45)


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
    base_job_template: Path | None = Field(
        None, description="JSON base job template for a pool flowhand creates")
    watch_interval_seconds: float = Field(2.0, gt=0)
    reconcile_interval_seconds: float = Field(60.0, gt=0)
    #: A claim older than this with no infrastructure, whose worker is gone, is handed back.
    claim_lease_seconds: float = Field(120.0, gt=0)
    takeover_interval_seconds: float = Field(30.0, gt=0)
    max_run_seconds: float | None = Field(None, gt=0)
    state_dir: Path = Field(default_factory=_default_state_dir)
    #: Below this much free space in state_dir the worker stops claiming runs (0: never).
    state_dir_min_free_bytes: int = Field(16 << 20, ge=0)
    api: APIConfig = Field(default_factory=APIConfig)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    retry_crashed: RetryCrashedConfig = Field(default_factory=RetryCrashedConfig)  # type: ignore[arg-type]
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)  # type: ignore[arg-type]
    http: HTTPConfig = Field(default_factory=HTTPConfig)  # type: ignore[arg-type]
    healthcheck: HealthcheckConfig = Field(default_factory=HealthcheckConfig)  # type: ignore[arg-type]
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    run_logs: RunLogsConfig = Field(default_factory=RunLogsConfig)  # type: ignore[arg-type]
    event_stream: EventStreamConfig = Field(default_factory=EventStreamConfig)  # type: ignore[arg-type]
    #: Backends' tables (`[docker]`, `[process]`, a plug-in's), as read: each backend's own
    #: model validates its table (see `backend_settings`).
    _backend_tables: dict[str, Any] = PrivateAttr(default_factory=dict)
    _path: Path | None = PrivateAttr(None)

    def backend_context(self) -> BackendContext:
        """The core facts a backend may use; its files go under this worker's own directory."""
        return BackendContext(state_dir=worker_dir(self.state_dir, self.name),
                              worker_name=self.name)

    #: Where each key's value came from, by key path (`("api", "url")`); defaults absent.
    _sources: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)
    #: PREFECT_* settings from Prefect's files, passed on to runs as Prefect's worker does.
    _prefect: PrefectSettings = PrivateAttr(default_factory=PrefectSettings)
    #: With `--profile`: the profile's settings, which win over the environment's.
    _profile_wins: frozenset[str] = PrivateAttr(default_factory=frozenset)

    def sources(self) -> dict[tuple[str, ...], str]:
        """Where each key that is not a default came from."""
        return dict(self._sources)

    def prefect_environment(self) -> dict[str, str]:
        """The PREFECT_* settings of Prefect's files, by environment-variable name."""
        return dict(self._prefect.values)

    def profile_wins(self) -> frozenset[str]:
        """PREFECT_* names a `--profile` sets, which win over the environment's."""
        return self._profile_wins

    def prefect_environment_sources(self) -> dict[str, str]:
        return dict(self._prefect.origins)

    @field_validator("name")
    @classmethod
    def _worker_name(cls, value: str) -> str:
        if not value or "/" in value or "%" in value:
            raise ValueError("must be non-empty and contain neither '/' nor '%'")
        return value

    @field_validator("type")
    @classmethod
    def _backend_alias(cls, value: str | None) -> str | None:
        # "subprocess" is the backend's former name; "process" is the pool type Prefect uses.
        return "process" if value == "subprocess" else value


# Variables that belong to the CLI rather than the model, and those of flowhand's own scripts
# (scripts/bootstrap.sh, bench/run: where their Prefect tool environments are), which a worker
# started from a developer's shell inherits.
_ENV_RESERVED = {"FLOWHAND_CONFIG", "FLOWHAND_PREFECT_ENV", "FLOWHAND_PREFECT_391_ENV",
                 "FLOWHAND_BENCH_ENV"}


def _env_layer(
    environ: Mapping[str, str], shadowed: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The environment's keys; Prefect names in `shadowed` (set by a `--profile`) are left out."""
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    sections = model_sections(Config)
    # Prefect's names first, so that FLOWHAND_ variables (more specific) win over them; a
    # table's former name (FLOWHAND_SUBPROCESS__) before its current one, which wins.
    ordered = sorted(environ.items(), key=lambda item: (not item[0].startswith("PREFECT_"),
                                                        item[0] == canonical_variable(item[0])))
    for var, value in ordered:
        path: tuple[str, ...]
        if var in PREFECT_SETTINGS and var not in shadowed:
            path = PREFECT_SETTINGS[var]
        elif var.startswith("FLOWHAND_") and var not in _ENV_RESERVED:
            parts = canonical_variable(var)[len("FLOWHAND_"):].lower().split("__")
            path = tuple(parts)
            known = (
                (len(path) == 1 and path[0] in Config.model_fields and path[0] not in sections)
                or (len(path) == 2 and path[0] in sections
                    and path[1] in sections[path[0]].model_fields)
                or (len(path) == 2 and path[0] not in Config.model_fields
                    and _backend_knows(path[0], path[1]))
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
        set_path(data, path, parsed)
        origins[path] = f"environment variable {var}"
    return data, origins


def _backend_knows(section: str, key: str) -> bool:
    """Whether `key` may stand in backend table [section]: a key of the backend's settings model;
    any key when the backend cannot be loaded here (checked if it is ever selected)."""
    owner = backend_for_section(section)
    if owner is None:
        return False
    return owner.backend is None or key in owner.backend.settings_model.model_fields


def config_file_path(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: `--config`, else `$FLOWHAND_CONFIG`, else `./worker.toml` if present."""
    if cli_path:
        return Path(cli_path)
    if environ.get("FLOWHAND_CONFIG"):
        return Path(environ["FLOWHAND_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _backend_tables(
    data: dict[str, Any], origins: dict[tuple[str, ...], str], path: Path | None
) -> tuple[dict[str, Any], list[str]]:
    """Take the backends' tables out of `data`; each is checked by its backend's model."""
    problems: list[str] = []
    tables: dict[str, Any] = {}
    for section in [key for key in data if key not in Config.model_fields]:
        owner = backend_for_section(section)
        if owner is None:
            continue  # not a backend's table: the model reports it as an unknown key
        tables[section] = data.pop(section)
        if owner.backend is not None:
            model = owner.backend.settings_model
            try:
                model.model_validate(tables[section])
            except ValidationError as exc:
                problems += validation_problems(exc, origins, path, model, (section,))
    return tables, problems


def load_config(
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    profile: str | None = None,
) -> Config:
    """Build the configuration from file, environment and CLI overrides (a nested dict).

    `profile` is `--profile`: that Prefect profile, whose settings win over PREFECT_*
    environment variables (as `prefect --profile` has them). Raises ConfigError with a message
    naming the source (file, variable or flag), the key and what was expected.
    """
    environ = os.environ if environ is None else environ
    prefect, prefect_data, origins = prefect_layer(environ, profile)
    shadowed = prefect.profile_names() if profile else frozenset()
    path = config_file_path(config_path, environ)
    file_data = canonical_tables(read_toml(path), Config.model_fields) if path else {}
    origins.update({p: str(path) for p in key_paths(file_data)})
    env_data, env_origins = _env_layer(environ, shadowed)
    origins.update(env_origins)
    cli_data = canonical_tables(drop_none(overrides or {}), Config.model_fields)
    for p in key_paths(cli_data):
        origins[p] = "command line"
    data = merge(merge(merge(prefect_data, file_data), env_data), cli_data)
    tables, problems = _backend_tables(data, origins, path)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, origins, path, Config) + problems
    if problems:
        raise ConfigError("; ".join(problems))
    config._backend_tables = tables
    config._sources = origins
    config._prefect = prefect
    config._profile_wins = shadowed
    config._path = path
    return config


def backend_settings(backend: type[Backend], config: Config) -> BaseModel:
    """`backend`'s settings from its table in `config` (defaults when there is none);
    ConfigError when they are invalid."""
    section = backend.settings_section
    table = config._backend_tables.get(section, {}) if section else {}
    try:
        settings: BaseModel = backend.settings_model.model_validate(table)
    except ValidationError as exc:
        raise ConfigError("; ".join(validation_problems(
            exc, config._sources, config._path, backend.settings_model, (section or "",)
        ))) from None
    return settings


def create_backend(backend: type[Backend], config: Config) -> Backend:
    """An instance of `backend` with its settings from `config`; ConfigError when they are bad."""
    return backend(backend_settings(backend, config), config.backend_context())
