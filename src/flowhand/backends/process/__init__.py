"""The `process` backend: each flow run as a local process (pool type `process`).

`backend.py` launches and watches runs, `launch.py` plans a start and spawns it cold, `handle.py`
holds a run's handle by concern; `engine_command.py` decides what runs (Prefect's engine,
its workspace supervisor, or the job's own command); `attempt_control.py` speaks Prefect's
attempt-control channel; `engine_hooks.py` runs on_crashed/on_cancellation hooks out of process;
`output_pipe.py` and `output_file.py` carry run output through a FIFO; `procfs.py` reads /proc;
`warm/` forks runs from a helper that imported Prefect once.
"""

from flowhand.backends.process.backend import ProcessBackend

__all__ = ["ProcessBackend"]
