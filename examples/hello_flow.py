"""The sample flow the demo deploys to a process pool and runs under flowhand."""

from prefect import flow, get_run_logger, task


@task
def greet(name: str) -> str:
    return f"hello, {name}!"


@flow(log_prints=True)
def hello(name: str = "world") -> str:
    message = greet(name)
    get_run_logger().info(message)
    return message
