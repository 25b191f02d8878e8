"""The worker agent beside each vLLM instance: owns the pool, serves and fetches peers."""

from lmshare.worker.agent import WorkerAgent
from lmshare.worker.config import WorkerConfig

__all__ = ["WorkerAgent", "WorkerConfig"]
