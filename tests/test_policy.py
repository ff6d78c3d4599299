"""The operator's policy on job variables: a run that breaks it is CRASHED naming the rule,
and nothing is started."""

from __future__ import annotations

from typing import Any

import pytest

from flowhand.config import load_config
from flowhand.errors import ConfigError
from tests.helpers import RunOnce, busybox_vars
from tests.prefect_env import API, engine_command


def test_process_pool_policy(api: API, run_once: RunOnce) -> None:
    """Overriding a denied variable (command) or a value outside the allow list crashes the
    run with the rule's name; a compliant run in the same pass completes."""
    pool = api.create_pool()
    plain = api.create_deployment(pool)
    denied = api.create_run(plain, job_variables={"command": engine_command()})
    disallowed = api.create_run(plain, job_variables={"stream_output": True})
    # The operator's own template sets the command; deployments only pick allowed values.
    api.call("PATCH", f"/work_pools/{pool}", json={"base_job_template": {
        "job_configuration": {"command": engine_command(), "stream_output": "{{ stream_output }}"},
        "variables": {"properties": {"stream_output": {"type": "boolean", "default": False}}},
    }})
    fine = api.create_run(plain, job_variables={"stream_output": False})
    logs = run_once(pool, policy={"deny": ["command"], "allow": {"stream_output": [False]}})
    assert "policy.deny: job variable 'command'" in api.state(denied)["message"]
    assert "policy.allow.stream_output" in api.state(disallowed)["message"]
    assert api.state(denied)["type"] == api.state(disallowed)["type"] == "CRASHED"
    assert api.state(fine)["type"] == "COMPLETED"
    started = {e["flow_run_id"] for e in logs if e["event"] == "flow_run.started"}
    assert started == {fine}


@pytest.mark.docker
def test_docker_pool_policy(
    api: API, run_once: RunOnce, docker_client: Any, busybox: str
) -> None:
    """privileged, image prefixes, host volume paths and a memory cap are enforced before any
    container is created."""
    pool = api.create_pool(type="docker")
    dep = api.create_deployment(pool)
    policy = {"allow": {"privileged": [False]}, "image_prefixes": ["flowhand-test/"],
              "volume_sources": ["/tmp/flowhand-data"], "max_mem_limit": "64m"}
    cases = {
        "privileged": (busybox_vars("engine", privileged=True), "policy.allow.privileged"),
        "image": ({**busybox_vars("engine"), "image": "evil.example/miner:1"},
                  "policy.image_prefixes"),
        "volume": (busybox_vars("engine", volumes=["/etc:/host-etc:ro"]),
                   "policy.volume_sources"),
        "memory": (busybox_vars("engine", mem_limit="1g"), "policy.max_mem_limit"),
    }
    runs = {k: api.create_run(dep, job_variables=v) for k, (v, _) in cases.items()}
    ok = api.create_run(dep, job_variables=busybox_vars(
        "engine", mem_limit="32m", volumes=["/tmp/flowhand-data/in:/in:ro", "scratch:/scratch"]))
    logs = run_once(pool, type="docker", policy=policy)
    for key, (_, rule) in cases.items():
        state = api.state(runs[key])
        assert state["type"] == "CRASHED" and rule in state["message"], (key, state)
    assert api.state(ok)["type"] == "COMPLETED"
    started = {e["flow_run_id"] for e in logs if e["event"] == "flow_run.started"}
    assert started == {ok}
    created = docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.work-pool-name={pool}"})
    assert len(created) == 1
    for container in created:
        container.remove(force=True)


def test_bad_policy_is_a_config_error() -> None:
    """A memory cap that is not a size is rejected at start-up, naming the key."""
    with pytest.raises(ConfigError, match="policy.max_mem_limit"):
        load_config(None, {"policy": {"max_mem_limit": "lots"}}, environ={})
