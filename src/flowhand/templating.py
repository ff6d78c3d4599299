"""Prefect's job-template language, re-implemented.

A base job template is `{"job_configuration": {...}, "variables": <JSON schema>}`. Values in the
configuration may hold `{{ name }}` placeholders. A string that is exactly one placeholder takes the
variable's typed value (a dict stays a dict); a missing one removes the key, so the job's own
default applies. Placeholders inside longer text are interpolated as strings, missing ones as "".
`{{ $NAME }}` reads the worker's environment. `{{ prefect.blocks.<type>.<name>[.path] }}` and
`{{ prefect.variables.<name> }}` are read from the API after the plain placeholders are applied.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from flowhand.config_layers import merge

PLACEHOLDER = re.compile(r"{{\s*([\w.\-\[\]$]+)\s*}}")
BLOCK_PREFIX = "prefect.blocks."
VARIABLE_PREFIX = "prefect.variables."


class _Missing:
    """Marks a placeholder with no value: its key or list item is dropped."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

_INDEX = re.compile(r"\[(\d+)\]")


def lookup(values: Any, dotted: str) -> Any:
    """Read `a.b[0].c` from nested dicts and lists; MISSING when any step is absent."""
    current = values
    for part in _INDEX.sub(r".\1", dotted).split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return MISSING
    return current


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    target[parts[-1]] = value


def _is_api_reference(name: str) -> bool:
    return name.startswith((BLOCK_PREFIX, VARIABLE_PREFIX))


def apply_values(template: Any, values: Mapping[str, Any]) -> Any:
    """Fill plain and `$ENV` placeholders; leave block and variable references for later."""
    if isinstance(template, str):
        matches = list(PLACEHOLDER.finditer(template))
        if not matches:
            return template
        names = [m.group(1) for m in matches]
        if len(matches) == 1 and matches[0].group(0) == template and not names[0].startswith("$"):
            if _is_api_reference(names[0]):
                return template
            return lookup(values, names[0])
        out = template
        for match, name in zip(matches, names, strict=True):
            if _is_api_reference(name):
                continue
            if name.startswith("$"):
                value = os.environ.get(name[1:], MISSING)
            else:
                value = lookup(values, name)
            out = out.replace(match.group(0), "" if value is MISSING else str(value))
        return out
    if isinstance(template, dict):
        filled = {k: apply_values(v, values) for k, v in template.items()}
        return {k: v for k, v in filled.items() if v is not MISSING}
    if isinstance(template, list):
        return [v for v in (apply_values(item, values) for item in template) if v is not MISSING]
    return template


def variable_defaults(variables_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults declared in the template's variables schema; `None` defaults are left out."""
    props = variables_schema.get("properties") or {}
    return {
        name: copy.deepcopy(spec["default"])
        for name, spec in props.items()
        if isinstance(spec, Mapping) and spec.get("default") is not None
    }


def merge_job_variables(
    deployment_vars: Mapping[str, Any] | None, flow_run_vars: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Deployment variables overridden by the run's own; `env` dicts are merged, not replaced."""
    merged = copy.deepcopy(dict(deployment_vars or {}))
    run_vars = copy.deepcopy(dict(flow_run_vars or {}))
    if isinstance(merged.get("env"), dict) and isinstance(run_vars.get("env"), dict):
        merged["env"] = {**merged["env"], **run_vars.pop("env")}
    merged.update(run_vars)
    return merged


def render_job_configuration(
    base_job_template: Mapping[str, Any], job_variables: Mapping[str, Any]
) -> dict[str, Any]:
    """The job configuration for one run, before API references are resolved.

    Same order as Prefect: schema defaults, then `env` defaults merged into a literal `env`,
    then dotted keys (`"env.FOO"`) expanded under nested ones, then `env` deep-merged, then
    placeholders applied.
    """
    config: dict[str, Any] = copy.deepcopy(dict(base_job_template.get("job_configuration") or {}))
    variables = variable_defaults(base_job_template.get("variables") or {})
    if variables.get("env"):
        if isinstance(config.get("env"), dict):
            config["env"] = {**config["env"], **variables["env"]}
        else:
            config["env"] = variables["env"]

    expanded: dict[str, Any] = {}
    for key, value in job_variables.items():
        if "." in key:
            set_dotted(expanded, key, value)
    for key, value in job_variables.items():
        if "." not in key:
            if isinstance(expanded.get(key), dict) and isinstance(value, dict):
                expanded[key] = merge(expanded[key], value)
            else:
                expanded[key] = value
    variables.update(expanded)

    if isinstance(config.get("env"), dict) and isinstance(variables.get("env"), dict):
        config["env"] = {**config["env"], **variables["env"]}
    result = apply_values(config, variables)
    assert isinstance(result, dict)
    return result


BlockReader = Callable[[str, str], Awaitable[dict[str, Any]]]
VariableReader = Callable[[str], Awaitable[Any]]


async def resolve_api_references(
    template: Any, read_block: BlockReader, read_variable: VariableReader
) -> Any:
    """Replace `{{ prefect.blocks.* }}` and `{{ prefect.variables.* }}` with values from the API."""
    if isinstance(template, dict):
        return {
            k: await resolve_api_references(v, read_block, read_variable)
            for k, v in template.items()
        }
    if isinstance(template, list):
        return [await resolve_api_references(v, read_block, read_variable) for v in template]
    if not isinstance(template, str):
        return template
    matches = [m for m in PLACEHOLDER.finditer(template) if _is_api_reference(m.group(1))]
    if not matches:
        return template
    resolved = [await _resolve_one(m, read_block, read_variable) for m in matches]
    if len(matches) == 1 and matches[0].group(0) == template:
        return resolved[0]
    out = template
    for match, value in zip(matches, resolved, strict=True):
        out = out.replace(match.group(0), str(value))
    return out


async def _resolve_one(
    match: re.Match[str], read_block: BlockReader, read_variable: VariableReader
) -> Any:
    """The value of one `{{ prefect.variables.NAME }}` or `{{ prefect.blocks.TYPE.NAME.PATH }}`."""
    name = match.group(1)
    if name.startswith(VARIABLE_PREFIX):
        return await read_variable(name[len(VARIABLE_PREFIX):])
    parts = name[len(BLOCK_PREFIX):].split(".", 2)
    if len(parts) < 2:
        raise ValueError(f"block reference {match.group(0)!r} needs a type and a name")
    data = await read_block(parts[0], parts[1])
    if len(parts) == 3:
        value = lookup(data, parts[2])
        if value is MISSING:
            raise ValueError(f"block reference {match.group(0)!r}: no {parts[2]!r} in block")
        return value
    return data["value"] if list(data) == ["value"] else data
