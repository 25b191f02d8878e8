"""The controller: worker registry, chunk → holders index, lookups, failure detection."""

from lmshare.controller.index import ChunkIndex
from lmshare.controller.registry import WorkerRecord, WorkerRegistry
from lmshare.controller.service import ControllerConfig, ControllerService

__all__ = ["ChunkIndex", "ControllerConfig", "ControllerService", "WorkerRecord", "WorkerRegistry"]
