"""From a flow run to a `Job`: job variables, template, references, environment and labels."""

from __future__ import annotations

import os
import uuid
from typing import Any

from pydantic import ValidationError

from flowhand import PREFECT_COMPAT_VERSION
from flowhand.api.cache import ReadCache
from flowhand.api.client import PrefectClient
from flowhand.api.models import Deployment, Flow, FlowRun, WorkPool
from flowhand.backends.base import Backend, Job
from flowhand.config import Config
from flowhand.errors import APIError, JobConfigError, NotFound
from flowhand.policy import check_policy
from flowhand.templating import (
    apply_values,
    merge_job_variables,
    render_job_configuration,
    resolve_api_references,
)

DEFAULT_COMMAND = "prefect flow-run execute"


def base_environment(config: Config, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The PREFECT_* settings the worker runs with, as Prefect hands them to flow runs.

    Lowest first: Prefect's settings files (profile, prefect.toml, .env), the worker's
    environment, then the API settings flowhand uses. Per-run internals (`PREFECT__*`) of the
    worker's own environment are not passed on.
    """
    environ = dict(os.environ if environ is None else environ)
    env = config.prefect_environment()
    env.update({
        k: v for k, v in environ.items()
        if k.startswith("PREFECT_") and not k.startswith("PREFECT__")
    })
    env["PREFECT_API_URL"] = config.api.url
    if config.api.key is not None:
        env["PREFECT_API_KEY"] = config.api.key.get_secret_value()
    if config.api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = config.api.auth_string.get_secret_value()
    return env


def run_environment(
    config: Config,
    flow_run: FlowRun,
    flow: Flow,
    deployment: Deployment | None,
    job_env: dict[str, str | None],
) -> dict[str, str]:
    """Later entries win: settings, flow run id, attribution, then the job's env."""
    env: dict[str, str | None] = {
        **base_environment(config),
        "PREFECT__FLOW_RUN_ID": str(flow_run.id),
        "PREFECT__WORKER_NAME": config.name,
        "PREFECT__FLOW_ID": str(flow.id),
        "PREFECT__FLOW_NAME": flow.name,
    }
    if deployment is not None:
        env["PREFECT__DEPLOYMENT_ID"] = str(deployment.id)
        env["PREFECT__DEPLOYMENT_NAME"] = deployment.name
    env.update(job_env)
    return {k: v for k, v in env.items() if v is not None}


def run_labels(
    config: Config,
    flow_run: FlowRun,
    flow: Flow,
    deployment: Deployment | None,
    pool: WorkPool,
    user_labels: dict[str, str],
) -> dict[str, str]:
    """Labels that identify a run's infrastructure, as Prefect sets them, then the user's."""
    labels = {
        "prefect.io/flow-run-id": str(flow_run.id),
        "prefect.io/flow-run-name": flow_run.name,
        "prefect.io/version": PREFECT_COMPAT_VERSION,
        "prefect.io/work-pool-name": pool.name,
        "prefect.io/work-pool-id": str(pool.id),
        "prefect.io/worker-name": config.name,
        "prefect.io/flow-id": str(flow.id),
        "prefect.io/flow-name": flow.name,
    }
    if deployment is not None:
        labels["prefect.io/deployment-id"] = str(deployment.id)
        labels["prefect.io/deployment-name"] = deployment.name
        if deployment.updated is not None:
            labels["prefect.io/deployment-updated"] = deployment.updated.isoformat()
    labels.update(user_labels)
    return labels


def _render_name(template: str | None, flow_run: FlowRun, flow: Flow) -> str:
    if not template:
        return flow_run.name
    values: dict[str, Any] = {
        "ctx": {"flow_run": flow_run.model_dump(mode="json"), "flow": flow.model_dump(mode="json")}
    }
    rendered = apply_values(template, values)
    return rendered if isinstance(rendered, str) and rendered else flow_run.name


def _max_run_seconds(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise JobConfigError(f"job variable max_run_seconds must be a number, got {value!r}") \
            from None
    if seconds <= 0:
        raise JobConfigError(f"job variable max_run_seconds must be positive, got {value!r}")
    return seconds


class JobBuilder:
    """Builds jobs for one worker; caches flows, whose names do not change."""

    def __init__(self, config: Config, client: PrefectClient, backend: Backend) -> None:
        self.config = config
        self.client = client
        self.backend = backend
        # A flow's name never changes: read each flow once, however many runs ask at once.
        self._flows: ReadCache[uuid.UUID, Flow] = ReadCache(client.read_flow, ttl_seconds=None)

    async def flow(self, flow_run: FlowRun) -> Flow:
        return await self._flows.get(flow_run.flow_id)

    async def _resolve(self, template: dict[str, Any], variables: dict[str, Any]) -> Any:
        """The job configuration: the template rendered with the variables, references to
        blocks and variables read from the API."""
        try:
            rendered = render_job_configuration(template, variables)
            resolved = await resolve_api_references(
                rendered, self.client.read_block_data, self.client.read_variable_value
            )
        except NotFound as exc:
            raise JobConfigError(f"a block or variable in the job template is missing: {exc}") \
                from None
        except (ValueError, TypeError) as exc:
            raise JobConfigError(f"cannot render the job template: {exc}") from None
        except APIError:
            raise
        if isinstance(resolved.get("command"), str) and not resolved["command"].strip():
            resolved["command"] = None
        return resolved

    async def build(self, flow_run: FlowRun, deployment: Deployment | None, pool: WorkPool) -> Job:
        """Raise JobConfigError when the template and variables do not make a valid job."""
        flow = await self.flow(flow_run)
        variables = merge_job_variables(
            deployment.job_variables if deployment else None, flow_run.job_variables
        )
        template = pool.base_job_template or self.backend.default_base_job_template()
        resolved = await self._resolve(template, variables)
        check_policy(self.config.policy, variables, resolved)
        try:
            job_config = self.backend.job_model.model_validate(resolved)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise JobConfigError(f"invalid job configuration: {problems}") from None
        env = run_environment(self.config, flow_run, flow, deployment, job_config.env)
        env = self.backend.prepare_env(env)
        return Job(
            flow_run=flow_run,
            flow_name=flow.name,
            deployment=deployment,
            pool=pool,
            worker_name=self.config.name,
            config=job_config.model_copy(
                update={"name": _render_name(job_config.name, flow_run, flow)}
            ),
            env=env,
            labels=run_labels(self.config, flow_run, flow, deployment, pool, job_config.labels),
            command=job_config.command or DEFAULT_COMMAND,
            command_is_default=not job_config.command,
            max_run_seconds=_max_run_seconds(variables.get("max_run_seconds"))
            or self.config.max_run_seconds,
        )
