"""The worker: a thin facade (`Worker`) over one module per role; see `facade`."""

from flowhand.worker.facade import Worker

__all__ = ["Worker"]
