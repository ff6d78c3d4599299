"""The base job template of a pool flowhand creates: `--base-job-template FILE` or the backend's.

As with `prefect worker start --base-job-template`, the file only matters when the pool does not
exist yet (or exists with an empty template); an existing pool's template is left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowhand.backends.base import Backend
from flowhand.config import Config
from flowhand.errors import ConfigError


def load_base_job_template(path: Path) -> dict[str, Any]:
    """The template in `path`; ConfigError naming the file when it is not a usable template."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--base-job-template {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--base-job-template {path}: cannot read it: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--base-job-template {path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
            isinstance(data.get(key), dict) for key in ("job_configuration", "variables")):
        raise ConfigError(f"--base-job-template {path}: a base job template is a JSON object "
                          "with 'job_configuration' and 'variables' objects (see `prefect "
                          "work-pool get-default-base-job-template --type process`)")
    return data


def template_for_pool(config: Config, backend: Backend) -> dict[str, Any]:
    """The template to create (or fill) the pool with."""
    if config.base_job_template is not None:
        return load_base_job_template(config.base_job_template)
    return backend.default_base_job_template()


def missing_pool(name: str, pool_type: str) -> str:
    """What to say about a pool that must exist (create_pool = false) and does not."""
    return (f"work pool {name!r} not found and create_pool is false; create it "
            f"(prefect work-pool create {name} --type {pool_type})")
