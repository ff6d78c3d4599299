"""A real Prefect flow, deployed by the tests and by the demo."""

from prefect import flow, get_run_logger


@flow(log_prints=True)
def hello(name: str = "world") -> str:
    get_run_logger().info("hello, %s!", name)
    return f"hello, {name}!"
