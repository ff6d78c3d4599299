"""The operator's limits on what deployment authors may ask for in `job_variables`.

Deployment authors control job variables; the person running the worker decides what this
worker will do. A run that breaks a rule is CRASHED with a message naming the rule, and nothing
is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowhand.config import PolicyConfig
from flowhand.errors import PolicyViolation
from flowhand.units import parse_bytes


def check_policy(
    policy: PolicyConfig, variables: Mapping[str, Any], resolved: Mapping[str, Any]
) -> None:
    """Raise PolicyViolation naming the rule; `variables` are what the deployment and run set,
    `resolved` is the job configuration they produced with the pool's template."""
    _check_deny(policy, variables)
    _check_allow(policy, variables)
    _check_image(policy, resolved)
    _check_volumes(policy, resolved)
    _check_mem_limit(policy, resolved)


def _check_deny(policy: PolicyConfig, variables: Mapping[str, Any]) -> None:
    for name in policy.deny:
        if name in variables or any(k.startswith(f"{name}.") for k in variables):
            raise PolicyViolation(f"policy.deny: job variable {name!r} may not be set "
                                  "(denied by this worker's operator)")


def _check_allow(policy: PolicyConfig, variables: Mapping[str, Any]) -> None:
    for name, allowed in policy.allow.items():
        if name in variables and variables[name] not in allowed:
            raise PolicyViolation(f"policy.allow.{name}: {variables[name]!r} is not one of "
                                  f"{allowed!r}")


def _check_image(policy: PolicyConfig, resolved: Mapping[str, Any]) -> None:
    image = resolved.get("image")
    if policy.image_prefixes and isinstance(image, str) and \
            not any(image.startswith(p) for p in policy.image_prefixes):
        raise PolicyViolation(f"policy.image_prefixes: image {image!r} does not start with "
                              f"one of {policy.image_prefixes!r}")


def _check_volumes(policy: PolicyConfig, resolved: Mapping[str, Any]) -> None:
    if not policy.volume_sources:
        return
    for volume in resolved.get("volumes") or []:
        source = str(volume).split(":", 1)[0]
        if ":" not in str(volume) or not source.startswith(("/", ".")):
            continue  # anonymous or named volumes mount no host path
        if not any(_under(source, root) for root in policy.volume_sources):
            raise PolicyViolation(f"policy.volume_sources: volume {volume!r} mounts a host "
                                  f"path outside {policy.volume_sources!r}")


def _check_mem_limit(policy: PolicyConfig, resolved: Mapping[str, Any]) -> None:
    if not policy.max_mem_limit:
        return
    cap = parse_bytes(policy.max_mem_limit)
    for key in ("mem_limit", "memswap_limit"):
        asked = resolved.get(key)
        if asked is None:
            continue
        try:
            size = parse_bytes(asked)
        except ValueError as exc:
            raise PolicyViolation(f"policy.max_mem_limit: {exc}") from None
        if size > cap:
            raise PolicyViolation(f"policy.max_mem_limit: {key} {asked!r} is over the cap "
                                  f"of {policy.max_mem_limit!r}")


def _under(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")
