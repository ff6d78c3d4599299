"""The Engine API's `POST /containers/create` request, from docker-py `containers.create`
arguments (the language of Prefect's `container_create_kwargs`).

docker-py's high-level `containers.create` inspects the container after creating it, a second
daemon call per run that flowhand does not need; its conversion is private. So flowhand splits
the arguments itself, as docker-py documents them: some go to the container's config, some to
its host config, a few (ports, volumes, network) to both. The host config and container config
themselves are docker-py's public `docker.types`, so values are checked and converted as
`containers.create` would (memory sizes, ulimits, port bindings, ...). Pure: no daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker.types
import docker.utils

from flowhand.errors import LaunchFailed

#: Arguments that go to the container's config (`create_container`), or to the query string.
CONFIG_KWARGS = frozenset({
    "command", "detach", "domainname", "entrypoint", "environment", "healthcheck", "hostname",
    "image", "labels", "mac_address", "name", "network_disabled", "platform", "stdin_open",
    "stop_signal", "tty", "use_config_proxy", "user", "working_dir",
})
#: Arguments that go to the host config as they are.
HOST_CONFIG_KWARGS = frozenset({
    "auto_remove", "blkio_weight_device", "blkio_weight", "cap_add", "cap_drop",
    "cgroup_parent", "cgroupns", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_shares", "cpuset_cpus", "cpuset_mems", "cpu_rt_period", "cpu_rt_runtime",
    "device_cgroup_rules", "device_read_bps", "device_read_iops", "device_write_bps",
    "device_write_iops", "devices", "device_requests", "dns_opt", "dns_search", "dns",
    "extra_hosts", "group_add", "init", "init_path", "ipc_mode", "isolation", "kernel_memory",
    "links", "log_config", "lxc_conf", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "mounts", "nano_cpus", "network_mode", "oom_kill_disable", "oom_score_adj",
    "pid_mode", "pids_limit", "privileged", "publish_all_ports", "read_only", "restart_policy",
    "security_opt", "shm_size", "storage_opt", "sysctls", "tmpfs", "ulimits", "userns_mode",
    "uts_mode", "volume_driver", "volumes_from", "runtime",
})
#: Arguments split over both (`ports`: exposed and bound; `volumes`: binds; `network`: the
#: network joined at create time), and the API version, which flowhand sets.
SPLIT_KWARGS = frozenset({"ports", "volumes", "network", "networking_config", "version"})


_INVALID = "cannot create the container: invalid container_create_kwargs or job variables"


@dataclass(frozen=True)
class CreateRequest:
    """What `APIClient.create_container_from_config` sends."""

    body: dict[str, Any]
    name: str | None = None
    platform: str | None = None


def _environment(env: Any, proxy_env: Mapping[str, str]) -> list[str] | None:
    """`KEY=value` entries, the Docker client's proxy settings first so the run's own win."""
    entries = docker.utils.format_environment(env) if isinstance(env, dict) else list(env or [])
    proxies = docker.utils.format_environment(dict(proxy_env))
    return (proxies + entries) or None


def _bind_target(bind: str) -> str:
    # Binds come from `parse_volume`: SOURCE:/container/path[:options], no colon in a part.
    return bind.split(":")[1]


def create_request(
    kwargs: Mapping[str, Any], api_version: str, proxy_env: Mapping[str, str]
) -> CreateRequest:
    """The create request for `containers.create(**kwargs)` against API `api_version`.

    `proxy_env`: the proxy variables of the Docker client's configuration, added to the
    environment unless `use_config_proxy` is false, as docker-py does. LaunchFailed names an
    unknown argument or a value docker-py cannot convert.
    """
    unknown = sorted(set(kwargs) - CONFIG_KWARGS - HOST_CONFIG_KWARGS - SPLIT_KWARGS)
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise LaunchFailed(f"{_INVALID}: unknown argument(s) {names} (container_create_kwargs "
                           "takes the arguments of docker-py's containers.create)")
    try:
        return _request(dict(kwargs), api_version, proxy_env)
    except LaunchFailed:
        raise
    except Exception as exc:  # noqa: BLE001
        # docker-py's converters raise whatever a value of the wrong shape makes them raise
        # (TypeError, ValueError, AttributeError, its own errors): all of it means bad input.
        raise LaunchFailed(f"{_INVALID}: {exc}") from None


def _request(
    args: dict[str, Any], api_version: str, proxy_env: Mapping[str, str]
) -> CreateRequest:
    args.pop("version", None)
    host = {key: args.pop(key) for key in list(args) if key in HOST_CONFIG_KWARGS}
    if args.get("ports"):
        host["port_bindings"] = args["ports"]
    binds = list(args.get("volumes") or [])
    if binds:
        host["binds"] = binds
    network = args.get("network")
    networking = None
    if network:
        host["network_mode"] = network
        endpoints = args.get("networking_config") or {}
        networking = {"EndpointsConfig": endpoints if network in endpoints else {network: {}}}
    host_config = docker.types.HostConfig(version=api_version, **host)

    use_proxy = args.get("use_config_proxy", True)
    exposed = [tuple(port.split("/", 1)) for port in sorted(host_config.get("PortBindings") or {})]
    body = docker.types.ContainerConfig(
        api_version,
        args["image"],
        args.get("command"),
        hostname=args.get("hostname"),
        user=args.get("user"),
        detach=args.get("detach", False),
        stdin_open=args.get("stdin_open", False),
        tty=args.get("tty", False),
        ports=exposed or None,
        environment=_environment(args.get("environment"), proxy_env if use_proxy else {}),
        volumes=[_bind_target(bind) for bind in binds] or None,
        network_disabled=args.get("network_disabled", False),
        entrypoint=args.get("entrypoint"),
        working_dir=args.get("working_dir"),
        domainname=args.get("domainname"),
        host_config=host_config,
        mac_address=args.get("mac_address"),
        labels=args.get("labels"),
        stop_signal=args.get("stop_signal"),
        networking_config=networking,
        healthcheck=args.get("healthcheck"),
    )
    return CreateRequest(body=dict(body), name=args.get("name"), platform=args.get("platform"))
