"""Lease and reservation handles: unguessable, bound to the client that took them, and a local
hit held past its lease is detected by its slab generations."""

import os

import zmq

from lmshare import ModelSignature, protocol
from lmshare.keys import signature_keys
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="lease-attack", chunk_tokens=16)
CHUNK = 200_000


def raw_call(endpoint: str, type_: str, **fields):
    """One request from a fresh connection (another local process, same user)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(protocol.encode(protocol.request(type_, 7, **fields)))
        assert sock.poll(5000, zmq.POLLIN), "no answer"
        return protocol.decode_raw(sock.recv())
    finally:
        sock.close()


def test_handles_are_unguessable_and_bound_to_their_client(cluster):
    cluster.start_controller()
    cluster.start_worker("w", "16MiB")
    endpoint = cluster.worker_endpoint("w")
    tokens = list(range(16 * 3))
    data = [os.urandom(CHUNK) for _ in range(3)]
    with cluster.client("w") as victim:
        victim.put(SIG, tokens, data)
        hits = [victim.acquire(SIG, tokens) for _ in range(20)]
        handles = [h.handle for h in hits]
        assert len(set(handles)) == 20 and min(handles) > 2**32
        assert sorted(b - a for a, b in zip(handles, handles[1:])) != [1] * 19
        for hit in hits[1:]:
            hit.release()
        hit = hits[0]
        leases = victim.stats()["leases"]
        # another client forges the release of the victim's real handle, and of small ones
        for handle in (hit.handle, *range(1, 50)):
            reply = raw_call(endpoint, "release", handle=handle)
            assert reply["type"] == "ok" and reply["released"] is False
        assert victim.stats()["leases"] == leases
        assert victim.stats()["counters"]["pinned_entries"] == 3
        assert [hit.read(i) for i in range(3)] == data and all(hit.verify(i) for i in range(3))

        # a reservation: another client can neither commit its slabs nor abort it
        keys = signature_keys(SIG, list(range(1000, 1016)))
        reply = raw_call(endpoint, "reserve", namespace=SIG.namespace(), keys=keys,
                         sizes=[CHUNK], incarnation=victim.incarnation)
        (handle, _slabs), = reply["reservations"]
        assert raw_call(endpoint, "commit", handles=[handle])["committed"] == 0
        assert raw_call(endpoint, "abort", handles=[handle])["type"] == "ok"
        assert victim.lookup_keys(SIG.namespace(), keys, peers=False) == (0, 0)
        hit.release()
        wait_until(lambda: victim.stats()["leases"] == leases, 5, "the client's own release")


def test_a_local_hit_held_past_its_lease_fails_verify(cluster):
    cluster.start_controller()
    cluster.start_worker("w", "4MiB")
    tokens = list(range(16 * 2))
    data = [os.urandom(CHUNK) for _ in range(2)]
    with cluster.client("w") as client:
        client.put(SIG, tokens, data)
        hit = client.acquire(SIG, tokens, lease_s=0.3)
        assert len(hit) == 2 and all(hit.verify(i) for i in range(2))
        # the lease expires (the worker's sweeper ends it) and the pool reuses the slabs
        wait_until(lambda: client.stats()["leases"] == 0, 10, "the lease to expire")
        for round_ in range(40):
            more = list(range(100_000 + round_ * 16, 100_000 + round_ * 16 + 16))
            client.put(SIG, more, [os.urandom(CHUNK)])
        assert client.stats()["counters"]["evictions"] > 0
        assert not hit.verify(0)  # detected, never silently wrong
        hit.release()
