"""Data-plane transports: how chunk bytes move from a peer's pool into ours."""

from lmshare.transports.base import ChunkSink, PeerInfo, Transport

__all__ = ["ChunkSink", "PeerInfo", "Transport"]
