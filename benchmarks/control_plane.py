"""The control plane at fleet size: 10,000 workers, 10 million chunks, one controller against
key-range shards (N controller processes), in one run.

Each controller is a real process started through the CLI with a cluster key (CurveZMQ on its
socket, as a cluster runs by default); with ``--shards 1,4`` the same workload runs against one
controller (today's deployment) and then against four shards (``lmshare controller --shard K/4``,
each its own port, owning the keys whose first byte b has b*4//256 == K). Simulated workers live
in a few processes, one DEALER socket (one CURVE connection) per worker and shard, and speak the
real protocol: register and heartbeat with every shard at its interval (1 s by default), send
each key's admits, evictions and full syncs (with digests) to the shard that owns it. Phases:

1. register the workers (``stats`` timed as the fleet grows: its cost against workers);
2. index the chunks in steps; after each, time lookups of 16 keys (a 4k-token prompt) from
   several client connections and read the controllers' RSS (the plot); a lookup goes to every
   shard that owns one of its keys at once and is answered when the last shard answered;
3. stream admits and evictions at a set rate while lookups run, and midway let one worker
   full-sync 1M keys (what a lookup waits behind a big sync);
4. kill every controller process at once and start them again: every worker re-registers and
   re-syncs; time the first lookup answered, the index complete (all shards together), and count
   workers declared dead on the way.

``python -m benchmarks.control_plane --help`` for sizes; ``python -m benchmarks control_plane``
runs the defaults (the fleet, one controller then four shards). Results go to ``--out`` (JSON,
rewritten after each phase, so a run cut short keeps what it measured) with a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import select
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from benchmarks.common import RESULTS, header, machine, percentile, table
from lmshare import protocol
from lmshare.control import DEFAULT_TIMEOUT_S
from lmshare.credentials import generate_key_file, load_key_file
from lmshare.curve import secure_client
from lmshare.shards import split_by_shard
from lmshare.worker.control_link import REGISTER_TIMEOUT_S, retry_backoff
from lmshare.worker.control_link import SYNC_PART_KEYS as SYNC_PART  # as a worker sends

NS = b"\x5a" * 16
ROOT = Path(__file__).resolve().parents[1]
# a worker's controller call deadlines, as lmshare.worker.control_link sets them
DEADLINE_S = {"register": REGISTER_TIMEOUT_S, "sync": 5.0}
LOOKUP_TIMEOUT_S = 0.5  # a lookup client gives up and asks again after this
PINNED = 16  # each worker's first chunks are never evicted: the prompts lookups ask for
REGISTER_RATE = 1000  # workers a simulating process starts a second
SCAN_S = 0.05  # a simulating process looks for heartbeats due and deadlines passed this often
# issue 16's targets
TARGET_BYTES_PER_KEY = 120
TARGET_RSS = 1.5 * 2**30
TARGET_P99_US = 500
TARGET_MAX_US = 10_000
TARGET_STREAM = 100_000
TARGET_STATS_MS = 200
TARGET_FIRST_ANSWER_S = 2.0
TARGET_COMPLETE_S = 30.0


def keys_of(worker: int, generation: int, count: int) -> list[bytes]:
    raw = np.random.default_rng([worker, generation]).bytes(16 * count)
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]


def by_shard(keys: list[bytes], shards: int) -> list[list[bytes]]:
    """``keys`` split into the shards that own them (in order within each)."""
    if shards == 1:
        return [keys]
    parts: list[list[bytes]] = [[] for _ in range(shards)]
    for key in keys:
        parts[key[0] * shards // 256].append(key)  # lmshare.shards.shard_of
    return parts


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bar:
    """A rich progress bar on a terminal; a line per step otherwise."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self._progress = None
        self._started = time.monotonic()
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._progress = Progress(transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        else:
            print(f"{description} ...", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        else:
            print(f"{self.description}: {self.done}/{self.total} in "
                  f"{time.monotonic() - self._started:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- simulated workers
class _Link:
    """One simulated worker's connection to one controller shard: the protocol's state (epoch,
    sequence, the call in flight, backoff) and the keys of that shard the worker holds."""

    __slots__ = ("index", "shard", "name", "socket", "epoch", "seq", "pending", "next_beat",
                 "pinned", "blocks", "state", "retry_at", "registered_at", "dead_seen",
                 "backoff", "unsent", "known", "instance", "batch_keys", "changes")

    def __init__(self, index: int, shard: int, socket: zmq.Socket, instance: bytes) -> None:
        self.index, self.shard, self.socket = index, shard, socket
        self.name = f"fw{index:05d}"  # the same worker on every shard
        self.epoch, self.seq = 0, 0
        self.pending: tuple[int, str, float] | None = None  # (id, type, sent)
        self.next_beat = 0.0
        self.pinned: list[bytes] = []
        self.blocks: deque[list[bytes]] = deque()  # what it holds past the pinned, oldest first
        self.state = "new"  # new → registering → syncing → up
        self.retry_at = 0.0
        self.backoff = retry_backoff()  # a worker's waits before registering again
        self.unsent: bytes | None = None  # the pending request, while not yet connected
        self.known = False  # registered, not told since that the controller forgot it
        self.instance = instance  # as a worker process's, sent with each registration
        self.registered_at = 0.0
        self.dead_seen = 0  # registrations the controller forgot (declared it dead) since mark
        self.batch_keys = 0  # admits plus evictions of the batch in flight
        self.changes: deque[dict] = deque()  # batches (or a full sync) waiting to go out

    def keys(self) -> list[bytes]:
        return self.pinned + [k for block in self.blocks for k in block]

    def take_oldest(self, count: int) -> list[bytes]:
        """Up to ``count`` of the oldest keys past the pinned, removed (to evict)."""
        out: list[bytes] = []
        while len(out) < count and self.blocks:
            block = self.blocks.popleft()
            need = count - len(out)
            out += block[:need]
            if len(block) > need:
                self.blocks.appendleft(block[need:])
        return out


def _controller_socket(context: zmq.Context, poller: zmq.Poller | None, key, port: int,
                       reconnect_max_ms: int) -> zmq.Socket:
    """A CURVE DEALER connected to a controller on loopback, registered with ``poller``."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_max_ms)
    secure_client(sock, key.curve_client())
    sock.connect(f"tcp://127.0.0.1:{port}")
    if poller is not None:
        poller.register(sock, zmq.POLLIN)
    return sock


class _Ready:
    """Which of thousands of sockets have replies: epoll on each socket's ZMQ_FD. (A zmq.Poller
    walks every socket it holds on every call: with 5,000 connections a simulating process
    spent its core polling.) ZMQ_FD only says that the socket's state may have changed, and a
    send can take that signal: a socket sent on is drained on the next turn as well."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Link] = {}
        self.touched: list[_Link] = []

    def add(self, link: _Link) -> None:
        fd = link.socket.getsockopt(zmq.FD)
        self.by_fd[fd] = link
        self.epoll.register(fd, select.EPOLLIN)

    def remove(self, link: _Link) -> None:
        fd = link.socket.getsockopt(zmq.FD)
        self.epoll.unregister(fd)
        del self.by_fd[fd]

    def wait(self, timeout_s: float) -> list[_Link]:
        ready = [self.by_fd[fd] for fd, _ in self.epoll.poll(timeout_s) if fd in self.by_fd]
        ready += self.touched
        self.touched = []
        return ready


def _simulate(first: int, count: int, ports: list[int], key_file: str, interval_s: float,
              digests_on: bool, conn) -> None:
    """Run ``count`` simulated workers, each linked to every shard on ``ports``, until told to
    stop; commands come on ``conn``."""
    key = load_key_file(key_file)
    shards = len(ports)
    context = zmq.Context(io_threads=1)
    # closed sockets are reaped a while later
    context.set(zmq.MAX_SOCKETS, 2 * count * shards + 64)
    ready = _Ready()
    links: list[_Link] = []
    of_worker: dict[int, list[_Link]] = {}  # a worker's links, in shard order
    for i in range(first, first + count):
        instance = os.urandom(16)
        of_worker[i] = []
        for shard, port in enumerate(ports):
            sock = _controller_socket(context, None, key, port, reconnect_max_ms=1000)
            link = _Link(i, shard, sock, instance)
            ready.add(link)
            links.append(link)
            of_worker[i].append(link)
    generation = dict.fromkeys(of_worker, 0)  # each worker's next keys_of generation
    pinned = dict.fromkeys(of_worker, 0)  # how many of its PINNED keys it has made

    def reset(w: _Link) -> None:
        """A new socket (and CURVE handshake) for ``w``, as RpcClient.reset() after a timeout."""
        ready.remove(w)
        w.socket.close(linger=0)
        w.socket = _controller_socket(context, None, key, ports[w.shard], reconnect_max_ms=1000)
        ready.add(w)
    ids = iter(range(1, 1 << 62))
    sent = {"register": 0, "sync": 0, "heartbeat": 0, "batch": 0, "timeouts": 0}
    applied = [0]  # admits plus evictions in batches the controllers answered
    refused: dict[str, int] = {}  # error replies by code (wrong_shard: a key sent astray)
    stream_rate = 0.0  # keys/s admitted (and as many evicted) by this process
    stream_carry = 0.0
    stream_batch = 64
    queued = [0]  # changes waiting in the links' queues, all links
    big_sync: dict[str, Any] | None = None
    big_links: set[int] = set()  # shards of the big sync's worker still syncing
    last = time.monotonic()
    paced = [interval_s] * shards  # the interval each shard asks for (longer while behind)

    def send(w: _Link, type_: str, **fields: Any) -> None:
        request_id = next(ids)
        sent[type_] = sent.get(type_, 0) + 1
        payload = protocol.encode(protocol.request(type_, request_id, **fields))
        w.pending = (request_id, type_, time.monotonic())
        try:
            w.socket.send(payload, zmq.NOBLOCK)
            ready.touched.append(w)
        except zmq.Again:  # not connected yet (IMMEDIATE, as a worker's socket): sent once
            w.unsent = payload  # it is, within the call's deadline

    def retry_later(w: _Link, now: float) -> None:
        """A worker's way after a call without answer or an unknown_worker error: drop the
        socket (a late reply must not be read as the next answer), wait its backoff."""
        w.pending = None
        w.state = "down"
        wait = w.backoff.next_wait()
        w.retry_at = now + (min(wait, paced[w.shard]) if w.known else wait)  # as control_link

    def register(w: _Link) -> None:
        w.state = "registering"
        send(w, "register", worker_id=w.name, host="127.0.0.1", data_port=20000 + w.index % 40000,
             transports=["tcp"], capacity_bytes=64 << 30, host_id=f"host{w.index // 8}",
             instance=w.instance)

    def sync(w: _Link, keys: list[bytes], part: int, final: bool) -> None:
        w.state = "syncing"
        digests = {"digests": {k: k for k in keys}} if digests_on and keys else {}
        send(w, "sync", worker_id=w.name, epoch=w.epoch, seq=w.seq, part=part, final=final,
             entries={NS: keys} if keys else {}, **digests)

    def batch(w: _Link, admit: list[bytes], evict: list[bytes]) -> None:
        w.seq += 1
        w.batch_keys = len(admit) + len(evict)
        send(w, "batch", worker_id=w.name, epoch=w.epoch, seq=w.seq,
             admit={NS: admit} if admit else {}, evict=evict,
             **({"digests": {k: k for k in admit}} if admit and digests_on else {}))

    def heartbeat(w: _Link) -> None:
        send(w, "heartbeat", worker_id=w.name, epoch=w.epoch, seq=w.seq,
             stats={"used_bytes": 1 << 30, "capacity_bytes": 64 << 30,
                    "free_bytes": 63 << 30, "local_hit_chunks": 0})
        w.next_beat = time.monotonic() + paced[w.shard]

    mark = [0.0]  # registrations after this time count in dead_seen
    syncing: dict[_Link, tuple[deque, int]] = {}  # link → (parts left, next part number)

    def start_sync(w: _Link) -> None:
        keys = w.keys()
        parts = deque(keys[i:i + SYNC_PART] for i in range(0, len(keys), SYNC_PART))
        first_part = parts.popleft() if parts else []
        w.seq += 1
        syncing[w] = (parts, 1)
        sync(w, first_part, 0, not parts)

    def on_reply(w: _Link, reply: dict) -> None:
        _, type_, _ = w.pending
        w.pending = None
        if reply.get("type") == "error":
            code = str(reply.get("code"))
            refused[code] = refused.get(code, 0) + 1
            if code == "unknown_worker":
                if w.registered_at > mark[0]:
                    w.dead_seen += 1
                w.known = False
                retry_later(w, time.monotonic())
            return
        if type_ == "heartbeat":
            paced[w.shard] = float(reply.get("heartbeat_interval_s", paced[w.shard]))
            w.backoff.reset()  # registered, synced and heard: up
            if w.state == "resuming":
                w.state = "up"  # it still knows this worker (a sync, if any, comes below)
        if type_ == "register":
            w.known = True
            w.epoch = reply["epoch"]
            w.registered_at = time.time()
            paced[w.shard] = float(reply.get("heartbeat_interval_s", paced[w.shard]))
            w.next_beat = time.monotonic() + paced[w.shard] * random.random()
            start_sync(w)
        elif type_ == "sync":
            parts, number = syncing.get(w, (deque(), 0))
            if parts:
                syncing[w] = (parts, number + 1)
                sync(w, parts.popleft(), number, not parts)
            else:
                syncing.pop(w, None)
                w.state = "up"
        elif type_ == "batch":
            applied[0] += w.batch_keys
        if type_ in ("heartbeat", "batch") and reply.get("resync"):
            start_sync(w)

    def next_change(w: _Link) -> None:
        """The link's next queued change goes out once it is free and up."""
        if w.changes and w.pending is None and w.state == "up":
            change = w.changes.popleft()
            queued[0] -= 1
            if change.get("sync"):
                if big_sync["started"] is None:
                    big_sync["started"] = time.time()
                start_sync(w)
            else:
                batch(w, change.get("admit", []), change.get("evict", []))

    def enqueue(w: _Link, change: dict) -> None:
        w.changes.append(change)
        queued[0] += 1
        next_change(w)

    start = time.monotonic()  # workers start over a few seconds, as a fleet's do
    for n, worker_links in enumerate(of_worker.values()):
        for w in worker_links:
            w.retry_at = start + n / REGISTER_RATE
    running = True
    last_scan = [0.0]
    while running:
        now = time.monotonic()
        # commands
        while conn.poll(0):
            command, arg = conn.recv()
            if command == "fill":  # each worker adds ``arg`` new chunks
                for i, worker_links in of_worker.items():
                    new = keys_of(i, generation[i], arg)
                    generation[i] += 1
                    take = max(0, min(len(new), PINNED - pinned[i]))
                    pinned[i] += take
                    for w, pin, rest in zip(worker_links, by_shard(new[:take], shards),
                                            by_shard(new[take:], shards)):
                        w.pinned += pin
                        if rest:
                            w.blocks.append(rest)
                        if pin or rest:
                            enqueue(w, {"admit": pin + rest})
                conn.send(("queued", queued[0]))
            elif command == "stream":
                stream_rate, stream_batch = arg
                conn.send(("streaming", stream_rate))
            elif command == "big_sync":  # the first worker here full-syncs ``arg`` more keys
                i = first
                big_sync = {"worker": of_worker[i][0].name, "started": None, "done": None}
                big_links.clear()
                big_links.update(range(shards))
                for w, part in zip(of_worker[i], by_shard(keys_of(i, 10**6, arg), shards)):
                    if part:
                        w.blocks.append(part)
                    enqueue(w, {"sync": True})
                conn.send(("big_sync", big_sync["worker"]))
            elif command == "status":
                states: dict[str, int] = {}
                for w in links:
                    states[w.state] = states.get(w.state, 0) + 1
                conn.send(("status", {"states": states, "queued": queued[0], "sent": dict(sent),
                                      "interval_s": max(paced), "applied_keys": applied[0],
                                      "errors": dict(refused),
                                      "dead_seen": sum(w.dead_seen for w in links),
                                      "big_sync": big_sync,
                                      "keys": sum(len(w.pinned) + sum(map(len, w.blocks))
                                                  for w in links)}))
            elif command == "mark":
                mark[0] = arg
                conn.send(("marked", arg))
            elif command == "stop":
                running = False
        # streaming: a worker evicts as many of its oldest as it admits new, on each shard
        if stream_rate:
            stream_carry += stream_rate * (now - last)
            while stream_carry >= stream_batch and queued[0] < 2 * len(links):
                i = random.randrange(first, first + count)
                new = keys_of(i, generation[i], stream_batch)
                generation[i] += 1
                for w, part in zip(of_worker[i], by_shard(new, shards)):
                    if part:
                        evict = w.take_oldest(len(part))
                        w.blocks.append(part)
                        enqueue(w, {"admit": part, "evict": evict})
                stream_carry -= stream_batch
        last = now
        # heartbeats, deadlines, re-registration (a scan of every link: every 50 ms, so that
        # the simulation leaves the CPU to the controllers)
        for w in links if now - last_scan[0] >= SCAN_S else ():
            if w.pending is not None:
                if w.unsent is not None:
                    try:
                        w.socket.send(w.unsent, zmq.NOBLOCK)
                        w.unsent = None
                        ready.touched.append(w)
                    except zmq.Again:
                        pass
                if now - w.pending[2] > DEADLINE_S.get(w.pending[1], DEFAULT_TIMEOUT_S):
                    sent["timeouts"] += 1  # lost, late, or never sent
                    syncing.pop(w, None)
                    if w.unsent is None:  # sent, no answer: RpcClient drops the socket
                        reset(w)
                    w.unsent = None
                    retry_later(w, now)
            elif w.state in ("down", "new") and now >= w.retry_at:
                if w.known:  # as a worker does: a heartbeat first, it may still be known
                    w.state = "resuming"
                    heartbeat(w)
                else:
                    register(w)
            elif w.state == "up" and now >= w.next_beat:
                heartbeat(w)
            else:
                next_change(w)
        if now - last_scan[0] >= SCAN_S:
            last_scan[0] = now
        for w in ready.wait(0.005):
            while True:
                try:
                    raw = w.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                if w.pending is not None and reply.get("id") == w.pending[0]:
                    was_big = big_sync is not None and w.index == first and \
                        w.shard in big_links and w.pending[1] == "sync" and \
                        big_sync["started"] and not big_sync["done"]
                    on_reply(w, reply)
                    if was_big and w.state == "up":
                        big_links.discard(w.shard)
                        if not big_links:
                            big_sync["done"] = time.time()
                    next_change(w)
    for w in links:
        w.socket.close(linger=0)
    context.term()


# ---------------------------------------------------------------------------- lookup clients
def _lookups(ports: list[int], key_file: str, workers: int, clients: int, rate: float,
             conn) -> None:
    """Lookups of 16 keys from ``clients`` clients, ``rate`` a second in all, until told to
    stop. A client has a connection to each shard; a lookup sends each shard the prompt's keys
    it owns, all at once, and is answered when the last of them answered (each client waits
    for its answer before its next lookup). Answers ("samples", [(unix time, round trip µs,
    matched)], timeouts) on request; matched is the prompt's held prefix over all shards."""
    key = load_key_file(key_file)
    shards = len(ports)
    context = zmq.Context()
    ports = _advertised_ports(context, key, ports)  # the lookup lane, where there is one
    print(f"lookup clients ask ports {ports}", file=sys.stderr, flush=True)
    poller = zmq.Poller()
    socks: list[list[zmq.Socket]] = []  # client → a socket per shard
    owner: dict[zmq.Socket, tuple[int, int]] = {}  # socket → (client, shard)
    for client in range(clients):
        row = []
        for shard, port in enumerate(ports):
            sock = _controller_socket(context, poller, key, port, reconnect_max_ms=500)
            owner[sock] = (client, shard)
            row.append(sock)
        socks.append(row)
    prompts = []  # per prompt: [(shard, positions in the prompt, keys)] of the shards it needs
    for w in random.Random(1).sample(range(workers), min(workers, 512)):
        keys = keys_of(w, 0, PINNED)
        prompts.append([(shard, positions, [keys[p] for p in positions])
                        for shard, positions in enumerate(split_by_shard(keys, shards))
                        if positions])
    # client → [request id, sent, shards left, positions by shard, prefix so far, all ok,
    # the shard that answered last]
    outstanding: dict[int, list] = {}
    samples: list[tuple[float, float, int]] = []
    errors = 0
    ids = iter(range(1, 1 << 62))
    active = False
    gap_s = clients / rate
    next_at = dict.fromkeys(range(clients), 0.0)

    def fire(client: int) -> None:
        request_id = next(ids)
        prompt = random.choice(prompts)
        started = time.perf_counter()
        for shard, _, keys in prompt:
            try:
                socks[client][shard].send(protocol.encode(protocol.request(
                    "lookup", request_id, namespace=NS, keys=keys)), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet (a controller restarting): ask again later
                return  # the answers of the shards already asked are dropped (their id)
        outstanding[client] = [request_id, started, {s for s, _, _ in prompt},
                               {s: p for s, p, _ in prompt}, PINNED, True, -1]

    while True:
        while conn.poll(0):
            command, arg = conn.recv()
            if command == "start":
                active = True
                samples, errors = [], 0
            elif command == "collect":
                active = False
                conn.send(("samples", samples, errors))
            elif command == "stop":
                for row in socks:
                    for sock in row:
                        sock.close(linger=0)
                context.term()
                return
        now = time.perf_counter()
        for client in range(clients):
            pending = outstanding.get(client)
            if pending is None and active and now >= next_at[client]:
                fire(client)
                next_at[client] = max(now, next_at[client] + gap_s * random.uniform(0.5, 1.5))
            elif pending is not None and now - pending[1] > LOOKUP_TIMEOUT_S:
                errors += 1  # no answer in a worker's deadline
                outstanding.pop(client)
        for sock, _ in poller.poll(1):
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            client, shard = owner[sock]
            pending = outstanding.get(client)
            if pending is None or reply.get("id") != pending[0] or shard not in pending[2]:
                continue
            pending[2].discard(shard)
            pending[6] = shard
            if reply.get("type") == "ok":
                positions = pending[3][shard]
                matched = reply.get("matched", 0)
                if matched < len(positions):  # this shard's first miss ends the prefix
                    pending[4] = min(pending[4], positions[matched])
            else:
                pending[5] = False
            if pending[2]:
                continue  # other shards still to answer
            outstanding.pop(client)
            if active:
                samples.append((time.time(), (time.perf_counter() - pending[1]) * 1e6,
                                pending[4] if pending[5] else -1, pending[6]))


# ---------------------------------------------------------------------------- the controllers
def _controller_help(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "lmshare", "controller", "--help"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=60).stdout


def shard_option(tree: Path) -> bool:
    """Whether the controller of ``tree`` takes ``--shard K/N``."""
    return "--shard" in _controller_help(tree)


def lookup_port_option(tree: Path) -> bool:
    """Whether the controller of ``tree`` has a lookup socket (``--lookup-port``)."""
    return "--lookup-port" in _controller_help(tree)


def _advertised_ports(context: zmq.Context, key, ports: list[int]) -> list[int]:
    """Each controller's lookup port as its ``ping`` reply advertises it (as routers learn
    it), else its control port (a controller without a lookup socket)."""
    from lmshare.control import advertised_lookup_port

    out = []
    for port in ports:
        sock = _controller_socket(context, None, key, port, reconnect_max_ms=500)
        sock.send(protocol.encode(protocol.request("ping", 1)))
        reply = msgpack.unpackb(sock.recv(), raw=False) if sock.poll(30_000) else {}
        sock.close(linger=0)
        out.append(advertised_lookup_port(reply) or port)
    return out


class Fleet:
    """The controller processes of one variant (``shards`` of them, from ``tree``) with
    simulated workers and lookup clients."""

    def __init__(self, tree: Path, label: str, shards: int, args: argparse.Namespace,
                 key_file: str, workdir: Path, digests: bool) -> None:
        self.tree, self.label, self.args, self.key_file = tree, label, args, key_file
        self.shards = shards
        self.digests = digests
        self.workdir = workdir
        # a lookup socket's port is fixed, so that it stays the same across the restart phase
        self.lookup_flag = lookup_port_option(tree)
        every = _free_ports(2 * shards if self.lookup_flag else shards)
        self.ports, self.lookup_ports = every[:shards], every[shards:]
        self.controllers: list[subprocess.Popen] = []
        self.sims: list[tuple[mp.Process, Any]] = []
        self.lookup_proc: mp.Process | None = None
        self.lookup_conn = None
        self.key = load_key_file(key_file)
        self.context = zmq.Context()
        self.clients: list[zmq.Socket | None] = [None] * shards
        self.ids = iter(range(1, 1 << 62))
        self.shard_flag = shards > 1 and shard_option(tree)
        if shards > 1 and not self.shard_flag:
            print(f"[{label}] this controller has no --shard option: each process indexes "
                  "whatever it is sent (the workload sends it only its shard's keys)",
                  file=sys.stderr, flush=True)

    def start_controllers(self) -> None:
        """Start every shard's process at once; return once each answers a ping."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(self.tree), os.environ.get("PYTHONPATH", "")) if p)}
        self.controllers = []
        for shard, port in enumerate(self.ports):
            log = open(self.workdir / f"controller-{self.label}-{shard}.log", "ab")
            extra = ["--shard", f"{shard}/{self.shards}"] if self.shard_flag else []
            if self.lookup_flag:
                extra += ["--lookup-port", str(self.lookup_ports[shard])]
            self.controllers.append(subprocess.Popen(
                [sys.executable, "-m", "lmshare", "--log-level", "warning", "controller", "--host",
                 "127.0.0.1", "--port", str(port), "--key-file", self.key_file, *extra],
                cwd=self.tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        for shard, proc in enumerate(self.controllers):
            while True:
                try:
                    self.call("ping", shard=shard, timeout_s=0.5)
                    break
                except TimeoutError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"controller shard {shard} exited; see "
                                           f"{self.workdir}/controller-{self.label}-{shard}.log"
                                           ) from None
                    if time.monotonic() > deadline:
                        raise

    def kill_controllers(self) -> None:
        for proc in self.controllers:
            proc.kill()
        for proc in self.controllers:
            proc.wait()
        for shard, sock in enumerate(self.clients):
            if sock is not None:
                sock.close(linger=0)
                self.clients[shard] = None

    def _client(self, shard: int) -> zmq.Socket:
        if self.clients[shard] is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, self.key.curve_client())
            sock.connect(f"tcp://127.0.0.1:{self.ports[shard]}")
            self.clients[shard] = sock
        return self.clients[shard]

    def _send(self, shard: int, type_: str, fields: dict) -> int:
        request_id = next(self.ids)
        self._client(shard).send(protocol.encode(protocol.request(type_, request_id, **fields)))
        return request_id

    def _receive(self, shard: int, request_id: int, deadline: float) -> dict:
        """The reply to ``request_id`` (older, late replies are dropped); TimeoutError, and a
        new socket next time, if none by ``deadline``."""
        sock = self.clients[shard]
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                sock.close(linger=0)
                self.clients[shard] = None
                raise TimeoutError(f"shard {shard}")
            reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            if reply.get("id") == request_id:
                return reply

    def call(self, type_: str, shard: int = 0, timeout_s: float = 30.0, **fields: Any) -> dict:
        request_id = self._send(shard, type_, fields)
        return self._receive(shard, request_id, time.monotonic() + timeout_s)

    def call_all(self, type_: str, timeout_s: float = 30.0, **fields: Any) -> list[dict]:
        """The same call to every shard at once; their replies, in shard order."""
        request_ids = [self._send(shard, type_, fields) for shard in range(self.shards)]
        deadline = time.monotonic() + timeout_s
        replies, missing = [], None
        for shard, request_id in enumerate(request_ids):
            try:
                replies.append(self._receive(shard, request_id, deadline))
            except TimeoutError as e:
                missing = missing or e
        if missing is not None:
            raise missing
        return replies

    def timed_stats(self) -> dict:
        """``stats`` (its first page) from every shard at once: ms until the last answered;
        then every page, shard by shard (ms of the slowest shard); workers listed (fewest)."""
        started = time.perf_counter()
        firsts = [r["stats"] for r in self.call_all("stats")]
        first_ms = (time.perf_counter() - started) * 1000
        all_ms, listed_min = 0.0, None
        for shard, first in enumerate(firsts):
            started = time.perf_counter()
            total = first["workers_total"]
            listed = len(first["workers"])
            while listed < total:
                page = self.call("stats", shard=shard, offset=listed)["stats"]
                if not page["workers"]:
                    break
                listed += len(page["workers"])
            all_ms = max(all_ms, (time.perf_counter() - started) * 1000)
            listed_min = listed if listed_min is None else min(listed_min, listed)
        return {"first_page_ms": first_ms, "all_pages_ms": all_ms, "listed": listed_min}

    def stats(self, timeout_s: float = 30.0) -> dict:
        """Every shard's ``stats`` (no workers listed), summed: chunks indexed over all shards,
        the fewest workers any shard knows, the dead events of all."""
        replies = self.call_all("stats", timeout_s=timeout_s, limit=1)
        each = [r["stats"] for r in replies]
        return {"chunks_indexed": sum(s["chunks_indexed"] for s in each),
                "workers_total": min(s["workers_total"] for s in each),
                "dead_events": sum(1 for s in each for e in s["events"] if e["kind"] == "dead"),
                "heartbeat_interval_s": max((r.get("heartbeat_interval_s") or 0)
                                            for r in replies) or None,
                "steps": _merge_steps([r.get("steps", {}) for r in replies])}

    def steps(self) -> dict:
        """The controllers' loop steps so far, by kind, all shards together: [count, over 10 ms
        of CPU] (only a controller that counts them says; none from a controller that did not
        answer within 30 s)."""
        try:
            return self.stats()["steps"]
        except TimeoutError:
            return {}

    def rss(self) -> list[int]:
        return [rss_bytes(proc.pid) for proc in self.controllers]

    def cpu(self) -> list[float]:
        return [cpu_seconds(proc.pid) for proc in self.controllers]

    def start_sims(self, first: int, count: int) -> None:
        parent, child = mp.Pipe()
        proc = mp.Process(target=_simulate, args=(first, count, self.ports, self.key_file,
                                                  1.0, self.digests, child), daemon=True)
        proc.start()
        self.sims.append((proc, parent))

    def sims_call(self, command: str, arg: Any = None) -> list:
        for _, conn in self.sims:
            conn.send((command, arg))
        return [conn.recv()[1] for _, conn in self.sims]

    def start_lookups(self) -> None:
        parent, child = mp.Pipe()
        self.lookup_proc = mp.Process(target=_lookups, args=(
            self.ports, self.key_file, self.args.workers, self.args.clients,
            self.args.lookup_rate, child), daemon=True)
        self.lookup_proc.start()
        self.lookup_conn = parent

    def lookups_for(self, seconds: float) -> tuple[list, int]:
        self.lookup_conn.send(("start", None))
        time.sleep(seconds)
        self.lookup_conn.send(("collect", None))
        _, samples, errors = self.lookup_conn.recv()
        return samples, errors

    def stop(self) -> None:
        try:
            self._stop_clients()
        finally:
            self.kill_controllers()
            self.context.term()

    def _stop_clients(self) -> None:
        for _, conn in self.sims:
            try:
                conn.send(("stop", None))
            except OSError:
                pass  # that simulating process died
        for proc, _ in self.sims:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if self.lookup_conn is not None:
            self.lookup_conn.send(("stop", None))
            self.lookup_proc.join(5)
            if self.lookup_proc.is_alive():
                self.lookup_proc.kill()


def _free_ports(count: int) -> list[int]:
    import socket

    holders, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            holders.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in holders:
            s.close()
    return ports


def _timed_stats(fleet: Fleet) -> dict:
    try:
        return fleet.timed_stats()
    except TimeoutError:  # a controller did not answer within 30 s
        return {"first_page_ms": None, "all_pages_ms": None, "listed": None}


def _ms(v: float | None) -> str:
    return "over 30 s" if v is None else f"{v:.0f} ms"


def _merge_steps(each: list[dict]) -> dict:
    out: dict[str, list[int]] = {}
    for steps in each:
        for kind, (count, slow) in steps.items():
            was = out.setdefault(kind, [0, 0])
            was[0] += count
            was[1] += slow
    return out


def _latency(samples: list, errors: int = 0) -> dict:
    rtts = [s[1] for s in samples if s[2] >= 0]
    if not rtts:
        return {"count": 0, "timeouts": errors}
    slow: dict[int, int] = {}  # lookups over 10 ms by the shard that answered last
    for s in samples:
        if s[2] >= 0 and s[1] > 10_000:
            slow[s[3]] = slow.get(s[3], 0) + 1
    return {"count": len(rtts), "p50_us": percentile(rtts, 0.5), "p99_us": percentile(rtts, 0.99),
            "max_us": max(rtts), "over_10ms": sum(r > 10_000 for r in rtts),
            "over_10ms_last_shard": slow,
            "hits": sum(1 for s in samples if s[2] == PINNED), "timeouts": errors}


def wait_for(what: str, condition, timeout_s: float, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except TimeoutError:  # a controller is busy (its answer waits behind the fleet's)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _step_diff(before: dict, after: dict) -> dict:
    """Steps over 10 ms of CPU between two readings, by kind (with the count of all)."""
    out = {}
    for kind, (count, slow) in after.items():
        was = before.get(kind, [0, 0])
        if count - was[0]:
            out[kind] = [count - was[0], slow - was[1]]
    return out


class _Cpu:
    """The controllers' CPU over a phase: cores used by the busiest shard and by all."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.started, self.before = fleet, time.monotonic(), fleet.cpu()
        self.others = self._others()

    def _others(self) -> float:
        """CPU of the simulating processes and the lookup clients."""
        procs = [p for p, _ in self.fleet.sims] + [self.fleet.lookup_proc]
        total = 0.0
        for proc in procs:
            try:
                total += cpu_seconds(proc.pid) if proc is not None else 0.0
            except OSError:
                pass
        return total

    def read(self) -> dict:
        wall = time.monotonic() - self.started
        used = [a - b for a, b in zip(self.fleet.cpu(), self.before)]
        return {"wall_s": wall, "busiest_cores": max(used) / wall, "all_cores": sum(used) / wall,
                "simulation_cores": (self._others() - self.others) / wall,
                "load": os.getloadavg()[0]}


def measure(tree: Path, label: str, shards: int, args: argparse.Namespace, key_file: str,
            workdir: Path, digests: bool, out: dict, checkpoint) -> dict:
    """Every phase against one variant; ``out`` filled as they go (``checkpoint()`` saves)."""
    fleet = Fleet(tree, label, shards, args, key_file, workdir, digests)
    out.update({"label": label, "shards": shards, "digests": digests,
                "shard_option": fleet.shard_flag, "lookup_lane": fleet.lookup_flag})
    timeout = args.phase_timeout_s
    try:
        fleet.start_controllers()
        out["rss_empty"] = sum(fleet.rss())
        # 1. register, timing stats as the fleet grows
        per_sim = -(-args.workers // args.sim_processes)
        bar = Bar(f"[{label}] register {args.workers} workers", args.workers)
        out["stats_ms"] = []
        cpu = _Cpu(fleet)
        for i in range(args.sim_processes):
            first = i * per_sim
            count = min(per_sim, args.workers - first)
            if count <= 0:
                break
            fleet.start_sims(first, count)
            target = first + count
            wait_for("registration", lambda t=target: fleet.stats()["workers_total"] >= t,
                     timeout, 0.5)
            bar.advance(count)
            out["stats_ms"].append({"workers": target, **_timed_stats(fleet)})
        bar.close()
        wait_for("every worker up", lambda: all(
            s["states"].get("up", 0) == sum(s["states"].values())
            for s in fleet.sims_call("status")), timeout)
        out["register_cpu"] = cpu.read()
        out["rss_registered"] = sum(fleet.rss())
        checkpoint()
        fleet.start_lookups()
        # 2. index in steps; lookups and RSS after each
        per_worker = args.keys // args.workers
        step_keys = per_worker // args.steps
        out["curve"] = []
        steps_before = fleet.steps()
        bar = Bar(f"[{label}] index {step_keys * args.steps * args.workers:,} chunks", args.steps)
        cpu = _Cpu(fleet)
        for step in range(args.steps):
            fleet.sims_call("fill", step_keys)
            expected = (step + 1) * step_keys * args.workers
            started = time.monotonic()
            wait_for("chunks indexed", lambda e=expected: fleet.stats()["chunks_indexed"] >= e
                     and all(s["queued"] == 0 for s in fleet.sims_call("status")), timeout, 0.5)
            fill_s = time.monotonic() - started
            samples, errors = fleet.lookups_for(args.lookup_s)
            rss = fleet.rss()
            out["curve"].append({"keys": expected, "rss": sum(rss), "rss_each": rss,
                                 "fill_s": fill_s, "lookup": _latency(samples, errors),
                                 "lookup_timeouts": errors})
            bar.advance()
            checkpoint()
        bar.close()
        out["fill_cpu"] = cpu.read()
        out["fill_steps"] = _step_diff(steps_before, fleet.steps())
        indexed = out["curve"][-1]["keys"]
        out["bytes_per_key"] = (out["curve"][-1]["rss"] - out["rss_registered"]) / indexed
        out["stats_full"] = {"workers": args.workers, **_timed_stats(fleet)}
        checkpoint()
        # 3. streaming admits and evictions, then a big full sync while they go on
        if not args.restart_only:
            _stream_and_big_sync(fleet, args, out, checkpoint)
        time.sleep(2.0)
        # 4. restart: kill, start again, every worker re-registers and re-syncs
        if not args.no_restart:
            out["restart"] = _restart(fleet, label, args)
        checkpoint()
    except Exception:
        out["at_failure"] = _diagnose(fleet)
        raise
    finally:
        fleet.stop()
    return out


def _diagnose(fleet: Fleet) -> dict:
    """Where a variant stood when a phase failed: the simulated links' states and calls, and
    what each shard says within 5 s (or that it did not answer)."""
    found: dict[str, Any] = {"time": time.time(), "load": os.getloadavg()}
    try:
        status = fleet.sims_call("status")
        states: dict[str, int] = {}
        for st in status:
            for k, v in st["states"].items():
                states[k] = states.get(k, 0) + v
        found["links"] = {"states": states, "queued": sum(st["queued"] for st in status),
                          "calls": _sent(fleet, status), "errors": _errors(status),
                          "interval_s": max(st["interval_s"] for st in status),
                          "dead_seen": sum(st["dead_seen"] for st in status)}
    except (OSError, EOFError) as e:
        found["links"] = f"{type(e).__name__}: {e}"
    shards = []
    for shard, proc in enumerate(fleet.controllers):
        entry: dict[str, Any] = {"alive": proc.poll() is None}
        try:
            entry["rss"] = rss_bytes(proc.pid)
            entry["cpu_s"] = cpu_seconds(proc.pid)
            started = time.perf_counter()
            reply = fleet.call("stats", shard=shard, timeout_s=5, limit=1)
            entry.update(answered_ms=(time.perf_counter() - started) * 1000,
                         chunks=reply["stats"]["chunks_indexed"],
                         workers=reply["stats"]["workers_total"],
                         heartbeat_interval_s=reply.get("heartbeat_interval_s"),
                         steps=reply.get("steps"))
        except TimeoutError:
            entry["answered_ms"] = None  # not within 5 s
        except OSError as e:
            entry["error"] = str(e)
        shards.append(entry)
    found["shards"] = shards
    return found


def _stream_and_big_sync(fleet: Fleet, args: argparse.Namespace, out: dict, checkpoint) -> None:
    rate = args.stream_rate / 2 / args.sim_processes  # admitted (and as many evicted) each
    fleet.sims_call("stream", (rate, 64))
    time.sleep(1.0)  # the stream under way
    steps_before = fleet.steps()
    applied_before = sum(s["applied_keys"] for s in fleet.sims_call("status"))
    cpu = _Cpu(fleet)
    started = time.monotonic()
    samples, errors = fleet.lookups_for(args.stream_s)
    applied_after = sum(s["applied_keys"] for s in fleet.sims_call("status"))
    out["stream"] = {"lookup": _latency(samples, errors), "lookup_timeouts": errors,
                     "keys_per_s": (applied_after - applied_before) / (time.monotonic() - started),
                     "steps": _step_diff(steps_before, fleet.steps()), "cpu": cpu.read()}
    checkpoint()
    steps_before = fleet.steps()
    cpu = _Cpu(fleet)
    fleet.sims[0][1].send(("big_sync", args.big_sync))
    fleet.sims[0][1].recv()
    fleet.lookup_conn.send(("start", None))
    try:
        big = wait_for("the big sync", lambda: (fleet.sims_call("status")[0]["big_sync"] or {})
                       .get("done"), args.phase_timeout_s, 0.2)
    except TimeoutError:  # the lookups meanwhile still count; the restart still runs
        big = None
    time.sleep(1.0)
    fleet.lookup_conn.send(("collect", None))
    _, samples, errors = fleet.lookup_conn.recv()
    status = fleet.sims_call("status")[0]["big_sync"]
    started = status["started"] or time.time()
    during = [s for s in samples if started <= s[0] <= (big or time.time()) + 1.0]
    out["big_sync"] = {"keys": args.big_sync, "seconds": big and big - started,
                       "lookup": _latency(during, errors), "lookup_timeouts": errors,
                       "rss": sum(fleet.rss()), "steps": _step_diff(steps_before, fleet.steps()),
                       "cpu": cpu.read()}
    fleet.sims_call("stream", (0.0, 64))
    checkpoint()


def _restart(fleet: Fleet, label: str, args: argparse.Namespace) -> dict:
    """Kill every controller process at once, start them again; time the first lookup answered
    (by every shard asked) and the index complete (all shards together), count the workers
    declared dead and the calls the workers made on the way."""
    expected_keys = wait_for("stats", fleet.stats, args.phase_timeout_s)["chunks_indexed"]
    sent_before = _sent(fleet)
    fleet.kill_controllers()
    restarted = time.time()
    fleet.sims_call("mark", restarted)
    fleet.start_controllers()
    ready = time.time()
    cpu = _Cpu(fleet)
    fleet.lookup_conn.send(("start", None))
    bar = Bar(f"[{label}] restart: re-sync {expected_keys:,} chunks", 100)
    complete = None
    progress = []  # (seconds since the kill, chunks indexed, workers registered, interval)
    deadline = time.monotonic() + args.restart_timeout_s
    while time.monotonic() < deadline:
        try:
            now_stats = fleet.stats(timeout_s=5)
        except TimeoutError:
            continue
        indexed_now = now_stats["chunks_indexed"]
        progress.append((round(time.time() - restarted, 2), indexed_now,
                         now_stats["workers_total"], now_stats["heartbeat_interval_s"]))
        bar.done = 0
        bar.advance(int(100 * indexed_now / max(1, expected_keys)))
        if indexed_now >= expected_keys:
            complete = time.time()
            break
        time.sleep(0.2)
    bar.close()
    time.sleep(args.restart_settle_s)  # heartbeats go on: any worker declared dead shows
    fleet.lookup_conn.send(("collect", None))
    _, samples, errors = fleet.lookup_conn.recv()
    answered = [s for s in samples if s[2] >= 0]
    full = [s for s in samples if s[2] == PINNED]
    stats = wait_for("stats", fleet.stats, args.phase_timeout_s)
    status = fleet.sims_call("status")
    sent_after = _sent(fleet, status)
    return {
        "keys": expected_keys, "ping_s": ready - restarted,
        "first_answer_s": (answered[0][0] - restarted) if answered else None,
        "first_full_hit_s": (full[0][0] - restarted) if full else None,
        "complete_s": (complete - restarted) if complete else None,
        "indexed": stats["chunks_indexed"], "workers": stats["workers_total"],
        "dead_events": stats["dead_events"],
        "declared_dead_seen_by_workers": sum(s["dead_seen"] for s in status),
        "calls": {k: sent_after.get(k, 0) - sent_before.get(k, 0) for k in sent_after},
        "worker_errors": _errors(status), "progress": progress, "cpu": cpu.read(),
        "lookup": _latency(answered, errors), "rss": sum(fleet.rss()), "steps": stats["steps"]}


def _sent(fleet: Fleet, status: list | None = None) -> dict:
    """The simulated workers' calls so far, by type (with the calls that got no answer)."""
    total: dict[str, int] = {}
    for s in status if status is not None else fleet.sims_call("status"):
        for kind, n in s["sent"].items():
            total[kind] = total.get(kind, 0) + n
    return total


def _errors(status: list) -> dict:
    """Error replies the simulated workers got since they started, by code."""
    total: dict[str, int] = {}
    for s in status:
        for code, n in s["errors"].items():
            total[code] = total.get(code, 0) + n
    return total


def baseline_tree(rev: str, workdir: Path) -> Path:
    tree = workdir / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# ---------------------------------------------------------------------------- the report
def _mark(value: float | None, limit: float, at_most: bool = True) -> str:
    if value is None:
        return "✗"
    return "✓" if (value <= limit if at_most else value >= limit) else "✗"


def _us(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f} µs" if v < 10_000 else f"{v / 1000:,.1f} ms"


def _lookup_cells(lookup: dict, timeouts: int) -> tuple[str, str]:
    """(p99 against the target, max and lookups over 10 ms or unanswered)."""
    p99, top = lookup.get("p99_us"), lookup.get("max_us")
    late = lookup.get("over_10ms", 0)
    worst = top if not timeouts else None
    extra = f"; {late:,} over 10 ms" if late else ""
    extra += f"; {timeouts:,} unanswered in {LOOKUP_TIMEOUT_S * 1000:.0f} ms" if timeouts else ""
    return (f"{_us(p99)} {_mark(p99, TARGET_P99_US)}",
            f"{_us(top)}{extra} {_mark(worst, TARGET_MAX_US)}")


def targets_table(results: list[dict], args: argparse.Namespace) -> str:
    """Issue 16's targets, a column per variant."""
    rows: list[list[str]] = []

    def row(what: str, target: str, cell) -> None:
        cells = []
        for r in results:
            try:
                cells.append(cell(r))
            except (KeyError, IndexError, TypeError):
                cells.append("not reached")
        rows.append([what, *cells, target])

    def final(r: dict) -> dict:
        return r["curve"][-1]

    row("index memory: RSS growth / chunks indexed (all shards)", f"≤ {TARGET_BYTES_PER_KEY} B",
        lambda r: f"{r['bytes_per_key']:.0f} B {_mark(r['bytes_per_key'], TARGET_BYTES_PER_KEY)}")
    row("controller RSS at the full index: all shards (largest)", "≤ 1.5 GiB",
        lambda r: f"{final(r)['rss'] / 2**30:.2f} GiB ({max(final(r)['rss_each']) / 2**30:.2f}) "
                  f"{_mark(final(r)['rss'], TARGET_RSS)}")
    row("16-key lookup round trip p99, full index", f"≤ {TARGET_P99_US} µs",
        lambda r: _lookup_cells(final(r)["lookup"], final(r)["lookup_timeouts"])[0])
    row("  max", "", lambda r: _lookup_cells(final(r)["lookup"], final(r)["lookup_timeouts"])[1]
        .rstrip(" ✓✗"))
    # met: the offered rate reaches the target and the controllers applied it (within 2 %:
    # the simulation offers it, it cannot be exceeded)
    row(f"admits + evictions applied while streaming (offered {args.stream_rate:,}/s)",
        f"≥ {TARGET_STREAM:,} keys/s",
        lambda r: f"{r['stream']['keys_per_s']:,.0f}/s "
                  f"{_mark(r['stream']['keys_per_s'] if args.stream_rate >= TARGET_STREAM else 0, 0.98 * args.stream_rate, at_most=False)}")
    row("lookup p99 while streaming", f"≤ {TARGET_P99_US} µs",
        lambda r: _lookup_cells(r["stream"]["lookup"], r["stream"]["lookup_timeouts"])[0])
    row("lookup max while streaming", "≤ 10 ms, none unanswered",
        lambda r: _lookup_cells(r["stream"]["lookup"], r["stream"]["lookup_timeouts"])[1])
    row(f"lookup p99 while a {args.big_sync:,}-key full sync is absorbed (and streaming)",
        f"≤ {TARGET_P99_US} µs",
        lambda r: _lookup_cells(r["big_sync"]["lookup"], r["big_sync"]["lookup_timeouts"])[0])
    row("lookup max while that sync is absorbed", "≤ 10 ms, none unanswered",
        lambda r: _lookup_cells(r["big_sync"]["lookup"], r["big_sync"]["lookup_timeouts"])[1])
    row(f"the {args.big_sync:,}-key full sync absorbed in", "",
        lambda r: f"{r['big_sync']['seconds']:.1f} s" if r["big_sync"]["seconds"] else
                  f"not in {args.phase_timeout_s:.0f} s")
    row(f"`stats` at {args.workers:,} workers (first page from every shard at once)",
        f"≤ {TARGET_STATS_MS} ms",
        lambda r: f"{r['stats_full']['first_page_ms']:.0f} ms "
                  f"{_mark(r['stats_full']['first_page_ms'], TARGET_STATS_MS)}")
    row("restart (every shard killed at once): first lookup answered, from the kill", "≤ 2 s",
        lambda r: f"{r['restart']['first_answer_s']:.2f} s "
                  f"{_mark(r['restart']['first_answer_s'], TARGET_FIRST_ANSWER_S)}")
    row("restart: index complete (all shards), from the kill", "≤ 30 s",
        lambda r: (f"{r['restart']['complete_s']:.1f} s" if r['restart']['complete_s'] else
                   f"not in {args.restart_timeout_s:.0f} s "
                   f"({r['restart']['indexed']:,} of {r['restart']['keys']:,})") + " "
                  f"{_mark(r['restart']['complete_s'], TARGET_COMPLETE_S)}")
    row("restart: workers declared dead", "0",
        lambda r: f"{r['restart']['declared_dead_seen_by_workers']} "
                  f"{_mark(r['restart']['declared_dead_seen_by_workers'], 0)}")
    row("error replies to the workers over the run, by code (unknown_worker: declared dead "
        "or not yet registered; wrong_shard: a key sent to a shard that does not own it)", "",
        lambda r: ", ".join(f"{k} {v:,}" for k, v in r["restart"]["worker_errors"].items())
        or "none")
    return table(["target (issue 16)", *[r["label"] for r in results], "target"], rows)


def report(results: list[dict], args: argparse.Namespace) -> str:
    text = targets_table(results, args)
    rows = []
    for r in results:
        for phase, key in (("registering", "register_cpu"), ("indexing", "fill_cpu"),
                           ("streaming", "stream"), ("big sync", "big_sync"),
                           ("since restart", "restart")):
            part = r.get(key) or {}
            c = part.get("cpu", part) if key in ("stream", "big_sync", "restart") else part
            if c:
                rows.append([r["label"], phase, f"{c['wall_s']:.0f} s",
                             f"{c['busiest_cores']:.2f}", f"{c['all_cores']:.2f}",
                             f"{c.get('simulation_cores', 0):.2f}", f"{c['load']:.1f}"])
    text += "\n\n" + table(["variant", "phase", "wall", "busiest controller, cores",
                            "all controllers, cores", "simulated workers and lookup clients, "
                            "cores", "load average"], rows)
    text += "\n\n" + table(
        ["variant", "phase", "loop steps over 10 ms of CPU (of all), all shards, by kind"],
        [[r["label"], phase, _steps_cell((r.get(key) or {}).get("steps") if key != "fill" else
                                         r.get("fill_steps"))]
         for r in results for phase, key in (("indexing", "fill"), ("streaming", "stream"),
                                             ("big sync", "big_sync"), ("since restart",
                                                                        "restart"))])
    text += "\n\n" + table(
        ["variant", *[f"stats at {p['workers']:,} workers (1st page / all)"
                      for p in results[0].get("stats_ms", [])]],
        [[r["label"], *[f"{_ms(p['first_page_ms'])} / {_ms(p['all_pages_ms'])}"
                        for p in r.get("stats_ms", [])]] for r in results])
    text += "\n\n" + table(
        ["variant", "indexed chunks", "RSS (all shards)", "lookup p50 / p99 / max", "fill"],
        [[r["label"], f"{p['keys']:,}", f"{p['rss'] / 2**30:.2f} GiB",
          f"{_us(p['lookup'].get('p50_us'))} / {_us(p['lookup'].get('p99_us'))} / "
          f"{_us(p['lookup'].get('max_us'))}", f"{p['fill_s']:.1f} s"]
         for r in results for p in r.get("curve", [])])
    restarted = [r for r in results if "restart" in r]
    text += "\n\n" + table(
        ["variant", "restart: process up / lookup answered / full hit / complete",
         "workers' calls from the kill on (timeouts: not answered within their deadline)",
         "seconds since the kill → chunks indexed, workers registered, heartbeat interval asked"],
        [[r["label"], _restart_cell(r["restart"]),
          ", ".join(f"{k} {v:,}" for k, v in r["restart"]["calls"].items() if v),
          "; ".join(f"{t:.1f} s → {k:,}, {w:,}, {i or '—'} s" for t, k, w, i in
                    r["restart"]["progress"][::max(1, len(r["restart"]["progress"]) // 8)])]
         for r in restarted])
    return text


def _steps_cell(steps: dict | None) -> str:
    if not steps:
        return "not counted"
    return ", ".join(f"{kind} {slow} ({count:,})" for kind, (count, slow) in
                     sorted(steps.items(), key=lambda kv: -kv[1][0]))


def _restart_cell(r: dict) -> str:
    def s(v):
        return "—" if v is None else f"{v:.1f} s"
    return (f"{s(r['ping_s'])} / {s(r['first_answer_s'])} / {s(r['first_full_hit_s'])} / "
            f"{s(r['complete_s'])}; {r['declared_dead_seen_by_workers']} declared dead")


def plot(data: dict, path: str, title: str | None = None) -> None:
    """Lookup round trips (p50, p99; log scale) and controller RSS against indexed chunks, a
    line per variant (``data["results"]``, each with its ``curve``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in data["results"]:
        curve = r.get("curve", [])
        keys = [p["keys"] / 1e6 for p in curve]
        line, = ax1.plot(keys, [p["lookup"].get("p99_us", 0) for p in curve], marker="o",
                         label=f"{r['label']} p99")
        ax1.plot(keys, [p["lookup"].get("p50_us", 0) for p in curve], marker=".",
                 linestyle="--", color=line.get_color(), label=f"{r['label']} p50")
        ax2.plot(keys, [p["rss"] / 2**30 for p in curve], marker="o", color=line.get_color(),
                 label=f"{r['label']}, all processes")
        if any(len(p.get("rss_each", [])) > 1 for p in curve):
            ax2.plot(keys, [max(p["rss_each"]) / 2**30 for p in curve], marker=".",
                     linestyle="--", color=line.get_color(), label=f"{r['label']}, largest")
    ax1.axhline(TARGET_P99_US, color="grey", linewidth=0.8, linestyle=":")
    ax1.set(xlabel="indexed chunks (millions)", ylabel="lookup round trip (µs, log scale)",
            title=title or f"16-key lookups, {data['workers']:,} workers heartbeating")
    ax1.set_yscale("log")
    ax2.axhline(TARGET_RSS / 2**30, color="grey", linewidth=0.8, linestyle=":")
    ax2.set(xlabel="indexed chunks (millions)", ylabel="controller RSS (GiB)",
            title="controller memory")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=10_000)
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--shards", "--variants", default="1,4", metavar="N[,N...]",
                   help="controller processes of each variant, run one after the other with "
                        "the same workload: 1 = one controller (no shards), N = N key-range "
                        "shards (default 1,4)")
    p.add_argument("--steps", type=int, default=10, help="indexing steps (points of the plot)")
    p.add_argument("--sim-processes", type=int, default=4)
    p.add_argument("--clients", type=int, default=16, help="lookup clients")
    p.add_argument("--lookup-rate", type=float, default=400.0, help="lookups a second in all")
    p.add_argument("--lookup-s", type=float, default=3.0, help="lookup time per step")
    p.add_argument("--stream-rate", type=int, default=100_000,
                   help="admitted plus evicted keys per second while streaming")
    p.add_argument("--stream-s", type=float, default=15.0)
    p.add_argument("--big-sync", type=int, default=1_000_000, help="keys of the one full sync")
    p.add_argument("--phase-timeout-s", type=float, default=300.0,
                   help="give up on a phase (registering, a step's indexing, the big sync) "
                        "after this long")
    p.add_argument("--restart-timeout-s", type=float, default=120.0)
    p.add_argument("--restart-settle-s", type=float, default=10.0,
                   help="heartbeats watched after the index is complete (workers declared "
                        "dead show within --heartbeat-timeout)")
    p.add_argument("--no-restart", action="store_true",
                   help="end each variant after the streaming phase (no restart phase)")
    p.add_argument("--restart-only", action="store_true",
                   help="register and index, then only the restart (no streaming, no big sync)")
    p.add_argument("--baseline", default="",
                   help="also run this git revision's controller (one process), e.g. fcf2635, "
                        "main before the compact index (needs the repository's history)")
    p.add_argument("--baseline-digests", action="store_true",
                   help="the baseline's workers send digests too (fcf2635 then indexes ~5k "
                        "keys/s past 1M digest records)")
    p.add_argument("--out", default=str(RESULTS / "control_plane.json"),
                   help="the results (JSON), rewritten after each phase; the plot beside it")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="measure nothing: print the report of saved results (an --out file, "
                        "or several variants' results merged into one) and plot it beside")
    args = p.parse_args(argv)
    args.shard_counts = [int(n) for n in str(args.shards).split(",") if n.strip()]
    return args


def _raise_open_files() -> None:
    """Sockets: a simulating process holds a connection per worker and shard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            return
        except (ValueError, OSError):
            continue


def run(argv: list[str] | None = None) -> tuple[str, dict]:
    args = parse(argv if argv is not None else [])
    mp.set_start_method("spawn", force=True)
    _raise_open_files()
    results: list[dict] = []
    data = {"workers": args.workers, "keys": args.keys, "args": vars(args), "machine": machine(),
            "results": results}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        out_path.write_text(json.dumps(data, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="lmshare-fleet-") as tmp:
        workdir = Path(tmp)
        key_file = str(workdir / "cluster.key")
        generate_key_file(key_file)
        variants = [(ROOT, "1 controller" if n == 1 else f"{n} shards", n, True)
                    for n in args.shard_counts]
        if args.baseline:
            # (its digest records cost ~220 µs an admit once full, a bug fixed with the compact
            # index: with digests it would not get far past 1M chunks, so it runs without)
            variants.append((baseline_tree(args.baseline, workdir),
                             f"baseline {args.baseline}", 1, args.baseline_digests))
        for tree, label, shards, digests in variants:
            out: dict[str, Any] = {}
            results.append(out)
            try:
                measure(tree, label, shards, args, key_file, workdir, digests, out, checkpoint)
            except Exception as e:  # the next variant still runs; the report says how far
                out["error"] = f"{type(e).__name__}: {e}"
                print(f"[{label}] stopped: {out['error']}", file=sys.stderr, flush=True)
            checkpoint()
    return report(results, args), data


if __name__ == "__main__":
    import signal

    # a SIGTERM (a timeout) unwinds through the finally blocks that stop the controllers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    options = parse(sys.argv[1:])
    if options.report:
        saved = json.loads(Path(options.report).read_text())
        print(report(saved["results"], argparse.Namespace(**saved["args"])))
        plot(saved, str(Path(options.report).with_suffix(".png")), saved.get("title"))
        sys.exit(0)
    text, data = run(sys.argv[1:])
    out = Path(data["args"]["out"])
    out.write_text(json.dumps(data, indent=2, default=str))
    plot(data, str(out.with_suffix(".png")))
    print(header("python -m benchmarks.control_plane " + " ".join(sys.argv[1:])))
    print(text)
