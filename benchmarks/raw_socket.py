"""The baseline: a plain Python loopback socket moving the same bytes (sendall → recv_into).

Same shape of traffic as an lmshare fetch: each request asks for ``count`` chunks of ``size``
bytes, the server sends them from ``count`` distinct buffers and the client receives them into
``count`` distinct buffers (so neither side reuses one cache-hot buffer the fetch does not have).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

from lmshare.transports.tcp import _tune


def _server(port_queue, size: int, count: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    _tune(conn)
    payloads = [memoryview(bytearray(size)) for _ in range(count)]
    header = bytearray(4)
    while True:
        if conn.recv_into(header, 4, socket.MSG_WAITALL) != 4:
            break
        (wanted,) = struct.unpack("<I", header)
        for index in range(wanted):
            conn.sendall(payloads[index % count])
    conn.close()


def measure(size: int, count: int, repeats: int, rounds: int = 5) -> list[float]:
    """GB/s of ``rounds`` rounds, each of ``repeats`` requests for ``count`` chunks of ``size``
    bytes."""
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_server, args=(queue, size, count),
                                              daemon=True)
    process.start()
    sock = socket.create_connection(("127.0.0.1", queue.get(timeout=30)), timeout=30)
    _tune(sock)
    buffers = [memoryview(bytearray(size)) for _ in range(count)]
    results = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        for _ in range(repeats):
            sock.sendall(struct.pack("<I", count))
            for buffer in buffers:
                received = 0
                while received < size:
                    received += sock.recv_into(buffer[received:], size - received)
        results.append(size * count * repeats / (time.perf_counter() - started) / 1e9)
    sock.close()
    process.join(10)
    return results[1:]  # the first round warms up
