"""A holder that accepts peer connections and never answers: registered with a cluster's
controller, with chunks in the index, so that a worker's fetches from it wait until their
deadline. Used by the fault tests and the latency benchmark."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lmshare.keys import ModelSignature, signature_keys


@contextmanager
def hanging_holder(cluster, signature: ModelSignature, tokens: Sequence[int],
                   name: str = "hanging") -> Iterator[str]:
    """Register ``name`` as a worker holding ``tokens``' chunks on a socket that never replies.

    ``cluster`` is a running :class:`lmshare.local_cluster.LocalCluster`. Yields the name."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed on exit
                return

    threading.Thread(target=accept, daemon=True).start()
    controller = cluster.controller_client(timeout_s=5)
    try:
        epoch = controller.call("register", worker_id=name, host="127.0.0.1",
                                data_port=server.getsockname()[1], transports=["tcp"],
                                capacity_bytes=1 << 30, host_id="elsewhere")["epoch"]
        keys = signature_keys(signature, list(tokens))
        controller.call("batch", worker_id=name, epoch=epoch, seq=1,
                        admit={signature.namespace(): keys}, evict=[],
                        digests={key: bytes(16) for key in keys})  # as a writer records
        yield name
    finally:
        stop.set()
        controller.close()
        server.close()
        for sock in accepted:
            sock.close()
