"""Real Prefect flows for the compatibility suite (tests/test_real_flows.py).

Each hook leaves a marker file `<run id>.<hook>` in $FIDELITY_MARK_DIR, so the tests can say
which hooks ran for which run, and how often.
"""

import os
import signal
import time
from pathlib import Path

from prefect import flow, task
from prefect.deployments import run_deployment
from prefect.flow_runs import pause_flow_run, suspend_flow_run


def _marks() -> Path:
    path = Path(os.environ["FIDELITY_MARK_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hook(name):
    def hook(flow, flow_run, state):
        with (_marks() / f"{flow_run.id}.{name}").open("a") as fh:
            fh.write(f"{state.type.value}\n")

    hook.__name__ = f"mark_{name}"
    return hook


HOOKS = {
    "on_completion": [_hook("completion")],
    "on_failure": [_hook("failure")],
    "on_crashed": [_hook("crashed")],
    "on_cancellation": [_hook("cancellation")],
}


@task
def add(a: int, b: int) -> int:
    return a + b


@flow(log_prints=True, persist_result=True, **HOOKS)
def completes(n: int = 1) -> int:
    total = add(add(add(n, 1), 2), 3)
    print(f"fidelity-print total={total}")
    return total


@flow(**HOOKS)
def fails() -> None:
    raise ValueError("fidelity: this flow fails")


@flow(retries=1, retry_delay_seconds=0)
def flaky() -> str:
    from prefect.runtime import flow_run

    first = _marks() / f"{flow_run.id}.attempt"
    if not first.exists():
        first.write_text("1")
        raise RuntimeError("fidelity: first attempt fails")
    return "second attempt"


@flow(timeout_seconds=2)
def times_out() -> None:
    time.sleep(60)


@flow(**HOOKS)
def killed() -> None:
    time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


@flow(**HOOKS)
def sleeper(seconds: float = 300) -> None:
    time.sleep(seconds)


@flow(persist_result=True)
def child(x: int = 1) -> int:
    return x * 2


@flow
def parent() -> int:
    inline = child(2)
    remote = run_deployment("child/fidelity-child", parameters={"x": 3}, timeout=240)
    assert remote.state.is_completed(), remote.state
    return inline + remote.state.result()


@flow(persist_result=True)
def suspends() -> str:
    suspend_flow_run(timeout=600)
    return "resumed after suspend"


@flow
def pauses() -> str:
    pause_flow_run(timeout=600)
    return "resumed after pause"


@flow
def serial(seconds: float = 3) -> None:
    time.sleep(seconds)
