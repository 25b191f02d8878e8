"""A baseline: Mooncake's transfer engine reading the same bytes over its TCP transport.

The target is a spawned process whose TransferEngine registers a buffer of ``count`` chunks; the
initiator (this process) reads every chunk into its own registered buffer with one batch read
per request. Metadata goes through Mooncake's P2P handshake mode, so no etcd / metadata server
runs; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import os
import queue as queue_mod
import time

HOST = "127.0.0.1"
METADATA = "P2PHANDSHAKE"  # peers exchange segment descriptors over the engine's own RPC port
PROTOCOL = "tcp"
TIMEOUT = 30.0


def _engine():
    """A TransferEngine initialised for TCP on loopback; RuntimeError when Mooncake is absent
    or does not come up."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # its INFO lines flood stderr otherwise
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # the wheel, or a shared library it needs (libibverbs), missing
        raise RuntimeError("Mooncake is not available (pip install "
                           f"mooncake-transfer-engine-non-cuda; needs libibverbs1): {exc}") from exc
    engine = TransferEngine()
    if engine.initialize(HOST, METADATA, PROTOCOL, "") != 0:
        raise RuntimeError("Mooncake TransferEngine failed to initialise "
                           f"(protocol {PROTOCOL!r}, metadata {METADATA!r})")
    return engine


def _buffer(nbytes: int) -> tuple[mmap.mmap, int]:
    """Anonymous page-aligned memory and its address."""
    memory = mmap.mmap(-1, nbytes)
    return memory, ctypes.addressof(ctypes.c_char.from_buffer(memory))


def _pattern(index: int, size: int) -> bytes:
    """Chunk ``index``'s contents: a byte ramp shifted by the index, so chunks differ."""
    ramp = bytes((index * 7 + b) & 0xFF for b in range(251))  # 251: a prime, not a page divisor
    return (ramp * (size // len(ramp) + 1))[:size]


def _target(reply, stop, size: int, count: int) -> None:
    try:
        engine = _engine()
        memory, address = _buffer(size * count)
        for i in range(count):
            memory[i * size:(i + 1) * size] = _pattern(i, size)
        if engine.register_memory(address, size * count) != 0:
            raise RuntimeError("Mooncake register_memory failed on the target")
        reply.put(("ok", f"{HOST}:{engine.get_rpc_port()}", address))
    except Exception as exc:  # reported to the initiator instead
        reply.put(("error", f"{type(exc).__name__}: {exc}", 0))
        return
    stop.wait(600)  # the initiator sets it, or terminates us
    engine.unregister_memory(address)


def measure(size: int, count: int, repeats: int, rounds: int = 1) -> list[float]:
    """GB/s of ``rounds`` rounds (after one warm-up round), each of ``repeats`` requests that
    read all ``count`` chunks of ``size`` bytes from the target process."""
    engine = _engine()  # fail fast, before spawning anything
    ctx = mp.get_context("spawn")
    reply, stop = ctx.Queue(), ctx.Event()
    process = ctx.Process(target=_target, args=(reply, stop, size, count), daemon=True)
    memory, local = _buffer(size * count)
    registered = False
    try:
        process.start()
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                status, session, remote = reply.get(timeout=0.2)
                break
            except queue_mod.Empty:
                if not process.is_alive():
                    raise RuntimeError("Mooncake target process died (exit code "
                                       f"{process.exitcode}) before it came up") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("Mooncake target did not come up in time") from None
        if status != "ok":
            raise RuntimeError(f"Mooncake target failed: {session}")
        if engine.register_memory(local, size * count) != 0:
            raise RuntimeError("Mooncake register_memory failed on the initiator")
        registered = True
        dst = [local + i * size for i in range(count)]
        src = [remote + i * size for i in range(count)]
        lengths = [size] * count

        # A sync read busy-polls its batch inside Mooncake and gives up (-1) after
        # MC_TRANSFER_TIMEOUT seconds (default 30) plus 1 ns per byte.
        def request() -> None:
            if engine.batch_transfer_sync_read(session, dst, src, lengths) != 0:
                raise RuntimeError("Mooncake batch_transfer_sync_read failed")

        request()  # also opens the connection and fetches the target's segment descriptor
        for i in range(count):
            if memory[i * size:(i + 1) * size] != _pattern(i, size):
                raise RuntimeError(f"Mooncake read chunk {i} wrong")
        results = []
        for _ in range(rounds + 1):
            started = time.perf_counter()
            for _ in range(repeats):
                request()
            results.append(size * count * repeats / (time.perf_counter() - started) / 1e9)
        return results[1:]  # the first round warms up
    finally:
        if registered:
            engine.unregister_memory(local)
        stop.set()
        if process.pid is not None:
            process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(5)
        reply.close()


if __name__ == "__main__":
    for label, (size, count, repeats) in {"4 MiB": (4 << 20, 8, 8),
                                          "32 MiB": (32 << 20, 4, 2)}.items():
        started = time.perf_counter()
        gbps = measure(size, count, repeats, rounds=3)
        print(f"{label} x {count}: " + ", ".join(f"{g:.2f}" for g in gbps)
              + f" GB/s ({time.perf_counter() - started:.1f} s)")
