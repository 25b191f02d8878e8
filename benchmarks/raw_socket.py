"""The baseline: a plain Python loopback socket moving the same bytes (sendall → recv_into)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

from lmshare.transports.tcp import _tune


def _server(port_queue, size: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    _tune(conn)
    payload = memoryview(bytearray(size))
    header = bytearray(4)
    while True:
        if conn.recv_into(header, 4, socket.MSG_WAITALL) != 4:
            break
        (count,) = struct.unpack("<I", header)
        for _ in range(count):
            conn.sendall(payload)
    conn.close()


def measure(size: int, repeats: int, rounds: int = 5) -> list[float]:
    """GB/s of ``rounds`` rounds, each moving ``repeats`` messages of ``size`` bytes."""
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_server, args=(queue, size), daemon=True)
    process.start()
    sock = socket.create_connection(("127.0.0.1", queue.get(timeout=30)), timeout=30)
    _tune(sock)
    buffer = memoryview(bytearray(size))
    results = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        sock.sendall(struct.pack("<I", repeats))
        for _ in range(repeats):
            received = 0
            while received < size:
                received += sock.recv_into(buffer[received:], size - received)
        results.append(size * repeats / (time.perf_counter() - started) / 1e9)
    sock.close()
    process.join(10)
    return results[1:]  # the first round warms up
