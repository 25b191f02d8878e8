"""The router's lookups over controller shards (``AsyncShardLinks``): every shard is asked for
its own keys at once, the answers merge into one prefix, and a shard that does not answer ends
the prefix at its first key."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmshare.control import ControllerClient
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.errors import ControllerUnavailable
from lmshare.router.controller_link import AsyncShardLinks
from lmshare.shards import Shard, shard_of
from lmshare.testing.waiting import slack

NS = b"n" * 16
# a prompt's keys: shard 0 owns first bytes 0x00-0x7f, shard 1 the rest
KEYS = [bytes([first]) + i.to_bytes(15, "big")
        for i, first in enumerate([0x01, 0x20, 0x90, 0x02, 0xf0])]


@pytest.fixture
def shards():
    services = [ControllerService(ControllerConfig(port=0, shard=Shard(i, 2))) for i in (0, 1)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in services]
    for thread in threads:
        thread.start()
    for index, service in enumerate(services):  # one worker holds the whole prompt
        client = ControllerClient("127.0.0.1", service.port, timeout_s=5.0)
        epoch = client.call("register", worker_id="w1", host="127.0.0.1", data_port=9000,
                            transports=["tcp"], capacity_bytes=1 << 20, host_id="h")["epoch"]
        client.call("batch", worker_id="w1", epoch=epoch, seq=1, evict=[],
                    admit={NS: [k for k in KEYS if shard_of(k, 2) == index]})
        client.close()
    yield services, threads
    for service, thread in zip(services, threads):
        service.stop()
        thread.join(5)


async def connected(services) -> AsyncShardLinks:
    """Links to every shard, each connected (a link's first call may find it still connecting)."""
    links = AsyncShardLinks(";".join(f"127.0.0.1:{s.port}" for s in services))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10 * slack()
    for link in links.shards:
        while True:
            try:
                await link.call("ping", 1.0)
                break
            except ControllerUnavailable:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
    return links


def test_a_lookup_merges_every_shards_answer(shards):
    services, _ = shards

    async def run():
        links = await connected(services)
        try:
            return await links.lookup(5.0, NS, KEYS)
        finally:
            links.close()
    reply = asyncio.run(run())
    assert reply["holders"] == [["w1"]] * len(KEYS)
    assert set(reply["workers"]) == {"w1"}


def test_a_silent_shard_ends_the_prefix_at_its_first_key(shards):
    services, threads = shards

    async def run():
        links = await connected(services)
        try:
            services[1].stop()  # its loop ends: nobody answers there any more
            await asyncio.to_thread(threads[1].join, 5)
            partial = await links.lookup(0.5, NS, KEYS)
            services[0].stop()
            await asyncio.to_thread(threads[0].join, 5)
            with pytest.raises(ControllerUnavailable):  # no shard answered: as without shards
                await links.lookup(0.5, NS, KEYS)
            return partial
        finally:
            links.close()
    assert asyncio.run(run())["holders"] == [["w1"], ["w1"]]  # up to KEYS[2], shard 1's first


def test_lookups_move_to_each_shards_advertised_lookup_port(shards):
    """A ping tells the router each shard's lookup port; the lookups after it go there, and a
    lookup port that stops answering is forgotten (the control port is asked again)."""
    services, _ = shards

    async def run():
        links = await connected(services)
        try:
            await links.learn_lookup_ports(5.0)
            for service, link in zip(services, links.shards):
                assert links.lookup_ports.get(link.address) == service.lookup_port
            reply = await links.lookup(5.0, NS, KEYS)
            assert reply["holders"] == [["w1"]] * len(KEYS)
            # shard 1's lookup port moves away (a controller restarted on another one)
            from lmshare.local_cluster import free_port

            links.lookup_ports.learn(links.shards[1].address, {"lookup_port": free_port()})
            await links.lookup(0.5, NS, KEYS)  # shard 1 does not answer there: forgotten
            assert links.lookup_ports.get(links.shards[1].address) is None
            return await links.lookup(5.0, NS, KEYS)
        finally:
            links.close()
    reply = asyncio.run(run())
    assert reply["holders"] == [["w1"]] * len(KEYS)
    assert services[0].served["lookup"]["lookups"] == 3
    assert services[0].served["control"]["lookups"] == 0
    assert services[1].served["lookup"]["lookups"] == 1
    assert services[1].served["control"]["lookups"] == 1
