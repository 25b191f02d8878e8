"""Which transport a worker uses for a peer: best first, TCP always works.

same-host shared memory  >  UCX (only where a worker advertises it: RDMA hardware, or forced)
>  TCP. Over plain TCP networks UCX loses to a socket, so a worker does not advertise it there.
"""

from __future__ import annotations

from lmshare.transports.base import PeerInfo

PREFERENCE = ("shm", "ucx", "tcp")


def choose_transport(local_host_id: str, local_transports: tuple[str, ...] | list[str],
                     peer: PeerInfo) -> str:
    for name in PREFERENCE:
        if name not in local_transports or name not in peer.transports:
            continue
        if name == "shm" and (not local_host_id or peer.host_id != local_host_id):
            continue
        return name
    return "tcp"
