"""A run's Job manifest, finished as Prefect's kubernetes worker finishes it (no cluster needed).

From the rendered `job_manifest`: the run's environment as a container `env` list (entries with
`valueFrom` kept), the eviction behaviour Prefect sets from `backoffLimit`, labels and annotation
keys made valid and copied to the pod template (the watch finds pods by them), the default image
and command, and a `generateName` from the job's name.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from typing import Any

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.backends.base import Job
from flowhand.backends.kubernetes.settings import KubernetesJobConfig
from flowhand.errors import JobConfigError
from flowhand.slugs import slugify

#: The label the watches select a pool's Jobs and pods by.
POOL_LABEL = "prefect.io/work-pool-name"
FLOW_RUN_LABEL = "prefect.io/flow-run-id"
#: The run's watch limits, kept on its Job so that a re-attaching worker applies the same.
POD_TIMEOUT_ANNOTATION = "flowhand.io/pod-watch-timeout-seconds"
JOB_TIMEOUT_ANNOTATION = "flowhand.io/job-watch-timeout-seconds"
#: One per start: finds a Job whose create answer was lost.
ATTEMPT_ANNOTATION = "flowhand.io/attempt"
SIGTERM_BEHAVIOR = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
DEFAULT_IMAGE = (f"prefecthq/prefect:{PREFECT_COMPAT_VERSION}-python"
                 f"{sys.version_info.major}.{sys.version_info.minor}")


def label_value(value: str, max_length: int = 63) -> str:
    slug = slugify(value, r"[^a-zA-Z0-9-_.]+", max_length, False, drop_quotes=False)
    return slug.strip("_-.") or value


def label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/") if "/" in key else ("", "", key)
    if "/" in key:
        prefix, name = key.split("/", 1)
    name_slug = (slugify(name, r"[^a-zA-Z0-9-_.]+", 63, False, drop_quotes=False).strip("_-.")
                 or name)
    if not prefix:
        return name_slug
    prefix_slug = (slugify(prefix, r"[^a-zA-Z0-9-.]+", 253, False, drop_quotes=False)
                   .strip("_-.") or prefix)
    return f"{prefix_slug}/{name_slug}"


def job_name_prefix(name: str | None) -> str:
    slug = slugify(name or "", r"[^a-zA-Z0-9-]+", 45, True, drop_quotes=False) if name else ""
    return f"{slug or 'prefect-job'}-"


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        container: dict[str, Any] = manifest["spec"]["template"]["spec"]["containers"][0]
    except (KeyError, IndexError, TypeError):
        raise JobConfigError("job_manifest has no spec.template.spec.containers[0]; "
                             "the pool's base job template must hold a batch/v1 Job") from None
    return container


def _env_list(env: dict[str, str], template_env: Any, backoff_limit: Any) -> list[Any]:
    """The run's environment first, then what the template hard-codes (valueFrom and all)."""
    env = dict(env)
    if backoff_limit == 0:
        env.setdefault(SIGTERM_BEHAVIOR, "reschedule")
    else:
        # Kubernetes owns retries then: the engine must not end the run on SIGTERM.
        env[SIGTERM_BEHAVIOR] = "relinquish"
    listed: list[Any] = [{"name": k, "value": v} for k, v in env.items()]
    if isinstance(template_env, list):
        listed += [e for e in template_env if isinstance(e, dict) and e.get("name") not in env]
    return listed


def _labelled(meta: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    merged = {**(meta.get("labels") or {}), **labels}
    return {label_key(k): label_value(str(v)) for k, v in merged.items()}


def job_manifest(job: Job, cfg: KubernetesJobConfig) -> dict[str, Any]:
    """The Job to create for this run."""
    manifest = copy.deepcopy(cfg.job_manifest)
    if not manifest:
        raise JobConfigError("the job configuration has no job_manifest; use a kubernetes "
                             "pool's base job template")
    meta = manifest.setdefault("metadata", {})
    spec = manifest.setdefault("spec", {})
    template = spec.setdefault("template", {})
    container = _container(manifest)
    container["env"] = _env_list(job.env, container.get("env"), spec.get("backoffLimit"))
    meta["labels"] = _labelled(meta, job.labels)
    annotations = {**(meta.get("annotations") or {}), **(cfg.annotations or {})}
    meta["annotations"] = {label_key(k): str(v) for k, v in annotations.items()}
    limits = {POD_TIMEOUT_ANNOTATION: str(cfg.pod_watch_timeout_seconds)}
    if cfg.job_watch_timeout_seconds is not None:
        limits[JOB_TIMEOUT_ANNOTATION] = str(cfg.job_watch_timeout_seconds)
    container.setdefault("image", DEFAULT_IMAGE)
    args = container.get("args")
    if args is None:
        container["args"] = shlex.split(job.command)
    elif isinstance(args, str):
        container["args"] = shlex.split(args)
    elif not isinstance(args, list):
        raise JobConfigError("job_manifest: the container's args must be a string or a list")
    generate = str(meta.get("generateName") or "")
    if not generate or "{{" in generate or generate in ("-", "None-"):
        meta["generateName"] = job_name_prefix(cfg.name)
    elif not meta.get("name") and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?-?", generate):
        # Prefect sends such a name and the apiserver refuses it; a valid one loses nothing.
        meta["generateName"] = job_name_prefix(generate)
    pod_meta = template.setdefault("metadata", {})
    pod_meta["labels"] = _labelled(pod_meta, job.labels)
    if meta["annotations"]:
        pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **meta["annotations"]}
    meta["annotations"].update(limits)
    namespace = cfg.namespace or meta.get("namespace") or "default"
    meta["namespace"] = namespace
    return manifest


def namespace_of(manifest: dict[str, Any]) -> str:
    return str((manifest.get("metadata") or {}).get("namespace") or "default")


def parse_pid(infrastructure_pid: str) -> tuple[str, str] | None:
    """(namespace, job name) from Prefect's `<namespace>:<job name>`; the older
    `<cluster uid>:<namespace>:<job name>` is read too."""
    parts = infrastructure_pid.split(":")
    if len(parts) == 3:
        parts = parts[1:]
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]
