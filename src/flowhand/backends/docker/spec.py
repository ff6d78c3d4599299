"""A run's container, decided without the daemon: name, labels, network, volumes, pull policy.

Everything here is pure, so Prefect's rules can be checked without Docker. `container_settings`
gathers a job into docker-py `containers.create` arguments (the language of
`container_create_kwargs`); `create_body` turns those into the Engine API's request.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import docker.types
import docker.utils
from structlog.typing import FilteringBoundLogger

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.backends.base import Job
from flowhand.backends.docker.settings import DockerJobConfig, ImagePullPolicy
from flowhand.errors import LaunchFailed

#: The label every Prefect-started container carries; flowhand finds its containers by it.
FLOW_RUN_LABEL = "io.prefect.flow-run-id"
#: Marks containers whose job asked for auto_remove, so a re-attached watcher removes them too.
AUTO_REMOVE_LABEL = "io.flowhand.auto-remove"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
HOST_DOCKER_INTERNAL = "host.docker.internal"
VOLUME_OPTIONS = {
    "ro", "rw", "z", "Z", "shared", "slave", "private", "rshared", "rslave", "rprivate",
    "nocopy", "consistent", "cached", "delegated",
}
#: container_create_kwargs that have a job variable (or flowhand's own handling) instead.
RESERVED_CREATE_KWARGS = (("environment", "env"), ("network", "networks"), ("detach", None),
                          ("remove", "auto_remove"))


def container_name(name: str | None) -> str | None:
    """A Docker-valid container name from the flow run name, as Prefect slugifies it.

    Prefect uses python-slugify with Docker's character set; this is the same rule without
    slugify's transliteration table (non-ASCII letters lose their accents or are dropped).
    """
    if not name:
        return None
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"[^a-zA-Z0-9_.-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).strip("-")
    text = text[:250].strip("-")
    # Docker names must start with a letter or digit.
    return text.lstrip("_-.") or None


def docker_labels(labels: dict[str, str]) -> dict[str, str]:
    """Prefect's labels in Docker's reverse-DNS form (`prefect.io/x` → `io.prefect.x`)."""
    out: dict[str, str] = {}
    for name, value in labels.items():
        if "/" in name:
            namespace, key = name.split("/", 1)
            name = ".".join(reversed(namespace.split("."))) + "." + key
        out[name] = value
    out["io.prefect.version"] = PREFECT_COMPAT_VERSION
    return out


def pull_policy(image: str, policy: ImagePullPolicy | None) -> ImagePullPolicy:
    """The effective policy: Kubernetes' (and Prefect's) defaulting when none is set."""
    if policy is not None:
        return policy
    _, tag = docker.utils.parse_repository_tag(image)
    if "@" in image:
        return "IfNotPresent"
    return "Always" if tag in (None, "latest") else "IfNotPresent"


def parse_volume(volume: str, cwd: str) -> tuple[str | None, str, str | None]:
    """(source, target, options) of a `volumes` entry; ValueError says what is wrong.

    A relative bind source (`.`, `./x`, `../x`) is resolved against the worker's directory, as
    prefect-docker 0.7.4 does; a source without a slash is a named volume.
    """
    spec = volume.strip()
    if not spec:
        raise ValueError("a volume cannot be empty")
    parts = spec.split(":")
    if len(parts) == 1:
        if not spec.startswith("/"):
            raise ValueError(
                f"{volume!r}: an anonymous volume is an absolute container path, e.g. '/data'"
            )
        return None, spec, None
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"{volume!r}: expected 'SOURCE:/container/path[:ro|rw]'")
    source, target = parts[0], parts[1]
    options = parts[2] if len(parts) == 3 else None
    if not target.startswith("/"):
        raise ValueError(f"{volume!r}: the container path {target!r} must be absolute")
    if source in (".", "..") or source.startswith(("./", "../")):
        source = os.path.normpath(os.path.join(cwd, source))
    elif not source.startswith("/") and ("/" in source or "\\" in source):
        raise ValueError(
            f"{volume!r}: {source!r} is neither an absolute path, a './relative' path nor a "
            "volume name"
        )
    if options is not None:
        unknown = set(options.split(",")) - VOLUME_OPTIONS
        if unknown:
            raise ValueError(
                f"{volume!r}: unknown volume option(s) {', '.join(sorted(unknown))} "
                "(use ro or rw)"
            )
    return source, target, options


@dataclass
class NetworkPlan:
    network_mode: str | None
    env: dict[str, str]
    extra_hosts: dict[str, str]


def _replace_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit(parts._replace(netloc=netloc))


def plan_network(
    config: DockerJobConfig,
    env: dict[str, str],
    rewrite: str,
    platform: str = sys.platform,
    host_gateway: bool = True,
) -> NetworkPlan:
    """How the container reaches the API, following prefect-docker's rules.

    `rewrite="auto"`: on Linux, a loopback API with no network chosen means host networking;
    otherwise `localhost`/`127.0.0.1` become `host.docker.internal`, mapped to the host's gateway.
    `"never"` leaves the URL and networking alone; any other value is the hostname to use instead
    of loopback (no host networking is inferred). A PREFECT_API_URL set in the job's own env is
    the user's choice and is never rewritten.
    """
    api_url = env.get("PREFECT_API_URL")
    host = urlsplit(api_url).hostname if api_url else None
    loopback = host in LOOPBACK_HOSTS
    mode = config.network_mode
    if mode is None and not config.networks and rewrite == "auto" and loopback \
            and platform == "linux":
        mode = "host"
    env = dict(env)
    extra_hosts: dict[str, str] = {}
    if mode != "host" and api_url and rewrite != "never":
        if loopback and "PREFECT_API_URL" not in config.env:
            target = HOST_DOCKER_INTERNAL if rewrite == "auto" else rewrite
            env["PREFECT_API_URL"] = api_url = _replace_host(api_url, target)
        # Docker Desktop resolves host.docker.internal by itself; a Linux engine needs the map.
        if urlsplit(api_url).hostname == HOST_DOCKER_INTERNAL and platform == "linux" \
                and host_gateway:
            extra_hosts[HOST_DOCKER_INTERNAL] = "host-gateway"
    return NetworkPlan(network_mode=mode, env=env, extra_hosts=extra_hosts)


def merge_extra_hosts(ours: dict[str, str], theirs: Any) -> dict[str, str]:
    """Our host map with container_create_kwargs' extra_hosts (a mapping or NAME:ADDRESS list)."""
    if isinstance(theirs, dict):
        return {**ours, **{str(k): str(v) for k, v in theirs.items()}}
    if isinstance(theirs, list):
        merged = dict(ours)
        for entry in theirs:
            name, sep, address = str(entry).partition(":")
            if sep:
                merged[name] = address
        return merged
    raise LaunchFailed("container_create_kwargs.extra_hosts must be a mapping or a list")


def _volumes(volumes: list[str], cwd: str) -> tuple[list[str], list[Any]]:
    """(binds, mounts) for the `volumes` job variable; LaunchFailed names a bad entry."""
    binds: list[str] = []
    mounts: list[Any] = []
    for volume in volumes:
        try:
            source, target, options = parse_volume(volume, cwd)
        except ValueError as exc:
            raise LaunchFailed(f"invalid volume: {exc}") from None
        if source is None:
            mounts.append(docker.types.Mount(target=target, source=None, type="volume"))
        else:
            binds.append(f"{source}:{target}" + (f":{options}" if options else ""))
    return binds, mounts


def _own_create_kwargs(cfg: DockerJobConfig, log: FilteringBoundLogger) -> dict[str, Any]:
    """container_create_kwargs less what job variables decide; LaunchFailed for what it may not
    set."""
    extra = dict(cfg.container_create_kwargs or {})
    clashing = sorted(k for k in extra if k in DockerJobConfig.model_fields)
    if clashing:
        # As Prefect does: job variables win over container_create_kwargs.
        log.warning("docker.create_kwargs_ignored", keys=clashing,
                    hint="set these as job variables instead")
        for key in clashing:
            del extra[key]
    for key, variable in RESERVED_CREATE_KWARGS:
        if key in extra:
            instead = f"; use the job variable {variable!r}" if variable else ""
            raise LaunchFailed(f"container_create_kwargs may not set {key!r}{instead}")
    return extra


def _checked_command(job: Job, cfg: DockerJobConfig) -> list[str]:
    """The run's command as argv, after the checks that make a start fail before any create."""
    try:
        command = shlex.split(job.command)
    except ValueError as exc:
        raise LaunchFailed(f"cannot parse command {job.command!r}: {exc}") from None
    if cfg.networks and cfg.network_mode:
        raise LaunchFailed(
            f"set either networks ({cfg.networks}) or network_mode ({cfg.network_mode!r}) in "
            "the job variables, not both"
        )
    return command


def container_settings(
    job: Job,
    cfg: DockerJobConfig,
    *,
    api_url_rewrite: str,
    host_gateway: bool,
    cwd: str,
    log: FilteringBoundLogger,
) -> dict[str, Any]:
    """docker-py `containers.create` arguments for the run; LaunchFailed says what to fix."""
    command = _checked_command(job, cfg)
    plan = plan_network(cfg, job.env, api_url_rewrite, host_gateway=host_gateway)
    binds, mounts = _volumes(cfg.volumes, cwd)
    extra = _own_create_kwargs(cfg, log)
    extra_hosts: dict[str, str] = plan.extra_hosts
    if "extra_hosts" in extra:
        extra_hosts = merge_extra_hosts(plan.extra_hosts, extra.pop("extra_hosts"))
    if "mounts" in extra:
        mounts = list(extra.pop("mounts")) + mounts

    settings: dict[str, Any] = {
        **extra,
        "image": cfg.image,
        "command": command,
        "environment": plan.env,
        "labels": {**docker_labels(job.labels),
                   **({AUTO_REMOVE_LABEL: "true"} if cfg.auto_remove else {})},
        "name": container_name(cfg.name),
        "auto_remove": False,
        "privileged": cfg.privileged,
    }
    optional = {
        "network": cfg.networks[0] if cfg.networks else None,
        "network_mode": plan.network_mode,
        "volumes": binds,
        "mounts": mounts,
        "extra_hosts": extra_hosts,
        "mem_limit": cfg.mem_limit,
        "memswap_limit": cfg.memswap_limit,
    }
    settings.update({k: v for k, v in optional.items() if v})
    return settings


def format_bytes(count: int) -> str:
    """A byte count as Docker's memory options write it (`16m`)."""
    for unit, size in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if count and count % size == 0:
            return f"{count // size}{unit}"
    return f"{count}b"


def oom_message(mem_limit: str | None, memswap_limit: str | None) -> str:
    """Why a container the kernel killed for memory ended, and what to change."""
    if mem_limit:
        limit = f"mem_limit={mem_limit}"
        if memswap_limit:
            limit += f", memswap_limit={memswap_limit}"
        return (f"The container ran out of memory and was killed by the kernel ({limit}). "
                "Raise mem_limit in the job variables or make the flow use less memory.")
    return ("The container ran out of memory and was killed by the kernel (no mem_limit set: "
            "the Docker host itself ran out of memory).")
