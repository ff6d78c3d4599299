"""Job templates resolve as Prefect resolves them (protocol reference §1.7)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from flowhand.templating import (
    apply_values,
    merge_job_variables,
    render_job_configuration,
    resolve_api_references,
)

PROCESS_TEMPLATE = json.loads(
    (Path(__file__).parent.parent / "src/flowhand/templates/process.json").read_text()
)


def test_single_placeholder_keeps_the_value_type() -> None:
    """A string that is exactly one placeholder becomes the raw typed value."""
    out = apply_values({"a": "{{ x }}", "b": "{{ y }}", "c": "{{n}}"},
                       {"x": {"k": [1, 2]}, "y": True, "n": 3})
    assert out == {"a": {"k": [1, 2]}, "b": True, "c": 3}


def test_missing_single_placeholder_removes_the_key() -> None:
    """A missing variable drops its key (and list item), so the job's default applies."""
    assert apply_values({"a": "{{ missing }}", "b": ["{{ missing }}", "x"]}, {}) == {"b": ["x"]}


def test_embedded_placeholders_interpolate_and_missing_become_empty() -> None:
    """Placeholders inside text are interpolated as strings; missing ones become ''."""
    assert apply_values("run-{{ a }}-{{ b }}", {"a": 7}) == "run-7-"


def test_env_placeholder_reads_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`{{ $NAME }}` reads the worker's environment, even as the whole string."""
    monkeypatch.setenv("FH_TEST_VAR", "from-env")
    assert apply_values({"a": "{{ $FH_TEST_VAR }}", "b": "x{{ $FH_NOPE }}y"}, {}) == {
        "a": "from-env", "b": "xy"}


def test_dotted_and_indexed_lookups() -> None:
    """`{{ a.b[1] }}` walks nested dicts and lists."""
    assert apply_values("{{ a.b[1] }}", {"a": {"b": ["x", "y"]}}) == "y"


def test_run_variables_override_deployment_and_env_merges() -> None:
    """Flow-run job variables win over the deployment's; `env` dicts merge key by key."""
    merged = merge_job_variables(
        {"command": "a", "env": {"A": "1", "B": "1"}}, {"command": "b", "env": {"B": "2"}}
    )
    assert merged == {"command": "b", "env": {"A": "1", "B": "2"}}


def test_process_template_with_defaults_and_variables() -> None:
    """The process pool template yields defaults plus the given variables, typed."""
    config = render_job_configuration(
        PROCESS_TEMPLATE, {"command": "echo hi", "env": {"X": "1"}, "working_dir": "/tmp"}
    )
    assert config == {"command": "echo hi", "env": {"X": "1"}, "working_dir": "/tmp",
                      "stream_output": True}


def test_template_env_defaults_merge_with_literal_env_and_dotted_keys() -> None:
    """Schema env defaults merge into a literal env; `env.KEY` variables land inside env."""
    template = {
        "job_configuration": {"env": {"FIXED": "f"}, "command": "{{ command }}"},
        "variables": {"properties": {"env": {"default": {"DEF": "d"}},
                                     "command": {"default": "run"}}},
    }
    config = render_job_configuration(template, {"env.EXTRA": "e"})
    assert config == {"env": {"FIXED": "f", "DEF": "d", "EXTRA": "e"}, "command": "run"}


def test_api_references_resolve_blocks_and_variables() -> None:
    """Block and variable references are read through the given readers, typed when whole."""

    async def read_block(slug: str, name: str) -> dict[str, object]:
        return {"secret": {"value": "s3"}, "json": {"a": 1, "b": 2}}[slug]

    async def read_variable(name: str) -> object:
        return {"img": "busybox:1", "n": 5}[name]

    template = {
        "image": "{{ prefect.variables.img }}",
        "n": "{{ prefect.variables.n }}",
        "token": "{{ prefect.blocks.secret.tok }}",
        "a": "{{ prefect.blocks.json.cfg.a }}",
        "text": "img={{ prefect.variables.img }}",
    }
    out = anyio.run(resolve_api_references, template, read_block, read_variable)
    assert out == {"image": "busybox:1", "n": 5, "token": "s3", "a": 1, "text": "img=busybox:1"}
