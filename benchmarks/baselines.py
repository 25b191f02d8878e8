"""Baselines measured beside lmshare: host memcpy and Redis GET (Debian's redis-server)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

from lmshare.local_cluster import free_port


def memcpy(size: int, count: int, repeats: int) -> float:
    """GB/s of host memory copies of ``count`` distinct ``size``-byte buffers into ``count``
    others, ``repeats`` times: the ceiling for any same-host path moving those bytes."""
    sources = [memoryview(bytearray(b"\x01" * size)) for _ in range(count)]
    destinations = [memoryview(bytearray(size)) for _ in range(count)]
    for source, destination in zip(sources, destinations):
        destination[:] = source
    started = time.perf_counter()
    for _ in range(repeats):
        for source, destination in zip(sources, destinations):
            destination[:] = source
    return size * count * repeats / (time.perf_counter() - started) / 1e9


class RedisServer:
    """A private redis-server on a loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="lmshare-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def get_gbps(self, size: int, count: int, repeats: int) -> float:
        """GB/s of fetching ``count`` values of ``size`` bytes per request (pipelined GETs)."""
        keys = [f"chunk-{size}-{i}" for i in range(count)]
        for key in keys:
            self.client.set(key, b"\x02" * size)
        started = time.perf_counter()
        for _ in range(repeats):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
            assert all(v is not None and len(v) == size for v in values)
        return size * count * repeats / (time.perf_counter() - started) / 1e9

    def parser(self) -> str:
        try:
            import hiredis  # noqa: F401

            return "redis-py with hiredis"
        except ImportError:
            return "redis-py (pure-Python parser)"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
