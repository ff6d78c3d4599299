"""Real parts shared by the test suite and the benchmark: a Prefect server in a tool environment
of its own, a private PostgreSQL cluster, and a small synchronous client of Prefect's REST API.

Nothing here imports Prefect or flowhand: the benchmark runs it in Prefect's tool environment,
the tests in flowhand's `.venv`. Both find it because the repository root is on `sys.path`
(pytest's rootdir; `bench/run` sets PYTHONPATH).
"""
