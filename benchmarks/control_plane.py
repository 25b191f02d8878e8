"""The control plane at fleet size: 10,000 workers, 10 million chunks, today's controller against
the one before the compact index, in one run.

Each controller is a real process started through the CLI with a cluster key (CurveZMQ on its
socket, as a cluster runs by default). Simulated workers live in a few processes, one DEALER
socket (one CURVE connection) each, and speak the real protocol: register, heartbeat at the
controller's interval (1 s by default), batches of admits with digests, full syncs. Phases:

1. register the workers (``stats`` timed as the fleet grows: its cost against workers);
2. index the chunks in steps; after each, time lookups of 16 keys (a 4k-token prompt) from
   several client connections and read the controller's RSS (the plot);
3. stream admits and evictions at a set rate while lookups run, and midway let one worker
   full-sync 1M keys (what a lookup waits behind a big sync);
4. kill the controller and start it again: every worker re-registers and re-syncs; time the
   first lookup answered, the index complete, and count workers declared dead on the way.

``python -m benchmarks.control_plane --help`` for sizes; ``python -m benchmarks control_plane``
runs the defaults (the fleet).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
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

from benchmarks.common import RESULTS, header, percentile, table
from lmshare import protocol
from lmshare.control import DEFAULT_TIMEOUT_S
from lmshare.credentials import generate_key_file, load_key_file
from lmshare.curve import secure_client
from lmshare.worker.control_link import REGISTER_TIMEOUT_S, retry_backoff
from lmshare.worker.control_link import SYNC_PART_KEYS as SYNC_PART  # as a worker sends

NS = b"\x5a" * 16
BASELINE = "fcf2635"  # main before the compact index: the dict-of-objects index
ROOT = Path(__file__).resolve().parents[1]
# a worker's controller call deadlines, as lmshare.worker.control_link sets them
DEADLINE_S = {"register": REGISTER_TIMEOUT_S, "sync": 5.0}
LOOKUP_TIMEOUT_S = 0.5  # a lookup client gives up and asks again after this
PINNED = 16  # each worker's first chunks are never evicted: the prompts lookups ask for
REGISTER_RATE = 1000  # workers a simulating process starts a second


def keys_of(worker: int, generation: int, count: int) -> list[bytes]:
    raw = np.random.default_rng([worker, generation]).bytes(16 * count)
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class Bar:
    """A rich progress bar on a terminal; a line per step otherwise."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self._progress = None
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


# ---------------------------------------------------------------------------- simulated workers
class _Worker:
    __slots__ = ("index", "name", "socket", "epoch", "seq", "pending", "next_beat", "pinned",
                 "blocks", "generation", "state", "retry_at", "registered_at", "dead_seen",
                 "backoff", "unsent", "known", "instance")

    def __init__(self, index: int, socket: zmq.Socket) -> None:
        self.index, self.name, self.socket = index, f"fw{index:05d}", socket
        self.epoch, self.seq = 0, 0
        self.pending: tuple[int, str, float] | None = None  # (id, type, sent)
        self.next_beat = 0.0
        self.pinned: list[bytes] = []
        self.blocks: deque[list[bytes]] = deque()  # what it holds past the pinned, oldest first
        self.generation = 0
        self.state = "new"  # new → registering → syncing → up
        self.retry_at = 0.0
        self.backoff = retry_backoff()  # a worker's waits before registering again
        self.unsent: bytes | None = None  # the pending request, while not yet connected
        self.known = False  # registered, not told since that the controller forgot it
        self.instance = os.urandom(16)  # as a worker process's, sent with each registration
        self.registered_at = 0.0
        self.dead_seen = 0  # registrations the controller forgot (declared it dead) since mark

    def keys(self) -> list[bytes]:
        return self.pinned + [k for block in self.blocks for k in block]


def _controller_socket(context: zmq.Context, poller: zmq.Poller, key, port: int,
                       reconnect_max_ms: int) -> zmq.Socket:
    """A CURVE DEALER connected to the controller on loopback, registered with ``poller``."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_max_ms)
    secure_client(sock, key.curve_client())
    sock.connect(f"tcp://127.0.0.1:{port}")
    poller.register(sock, zmq.POLLIN)
    return sock


def _simulate(first: int, count: int, port: int, key_file: str, interval_s: float,
              digests_on: bool, conn) -> None:
    """Run ``count`` simulated workers until told to stop; commands come on ``conn``."""
    key = load_key_file(key_file)
    context = zmq.Context(io_threads=1)
    context.set(zmq.MAX_SOCKETS, 2 * count + 64)  # closed sockets are reaped a while later
    poller = zmq.Poller()
    workers: dict[zmq.Socket, _Worker] = {}
    for i in range(first, first + count):
        sock = _controller_socket(context, poller, key, port, reconnect_max_ms=1000)
        workers[sock] = _Worker(i, sock)

    def reset(w: _Worker) -> None:
        """A new socket (and CURVE handshake) for ``w``, as RpcClient.reset() after a timeout."""
        poller.unregister(w.socket)
        del workers[w.socket]
        w.socket.close(linger=0)
        w.socket = _controller_socket(context, poller, key, port, reconnect_max_ms=1000)
        workers[w.socket] = w
    ids = iter(range(1, 1 << 62))
    sent = {"register": 0, "sync": 0, "heartbeat": 0, "batch": 0, "timeouts": 0}
    stream_rate = 0.0  # keys/s admitted (and as many evicted) by this process
    stream_carry = 0.0
    stream_batch = 64
    queue: deque[tuple[str, dict]] = deque()  # (worker name, message) waiting for its worker
    by_name = {w.name: w for w in workers.values()}
    big_sync: dict[str, Any] | None = None
    last = time.monotonic()

    def send(w: _Worker, type_: str, **fields: Any) -> None:
        request_id = next(ids)
        sent[type_] = sent.get(type_, 0) + 1
        payload = protocol.encode(protocol.request(type_, request_id, **fields))
        w.pending = (request_id, type_, time.monotonic())
        try:
            w.socket.send(payload, zmq.NOBLOCK)
        except zmq.Again:  # not connected yet (IMMEDIATE, as a worker's socket): sent once
            w.unsent = payload  # it is, within the call's deadline

    def retry_later(w: _Worker, now: float) -> None:
        """A worker's way after a call without answer or an unknown_worker error: drop the
        socket (a late reply must not be read as the next answer), wait its backoff."""
        w.pending = None
        w.state = "down"
        wait = w.backoff.next_wait()
        w.retry_at = now + (min(wait, paced[0]) if w.known else wait)  # as control_link does

    def register(w: _Worker) -> None:
        w.state = "registering"
        send(w, "register", worker_id=w.name, host="127.0.0.1", data_port=20000 + w.index % 40000,
             transports=["tcp"], capacity_bytes=64 << 30, host_id=f"host{w.index // 8}",
             instance=w.instance)

    def sync(w: _Worker, keys: list[bytes], part: int, final: bool) -> None:
        w.state = "syncing"
        digests = {"digests": {k: k for k in keys}} if digests_on and keys else {}
        send(w, "sync", worker_id=w.name, epoch=w.epoch, seq=w.seq, part=part, final=final,
             entries={NS: keys} if keys else {}, **digests)

    def batch(w: _Worker, admit: list[bytes], evict: list[bytes]) -> None:
        w.seq += 1
        send(w, "batch", worker_id=w.name, epoch=w.epoch, seq=w.seq,
             admit={NS: admit} if admit else {}, evict=evict,
             **({"digests": {k: k for k in admit}} if admit and digests_on else {}))

    paced = [interval_s]  # the interval the controller asks for (longer while it is behind)

    def heartbeat(w: _Worker) -> None:
        send(w, "heartbeat", worker_id=w.name, epoch=w.epoch, seq=w.seq,
             stats={"used_bytes": 1 << 30, "capacity_bytes": 64 << 30,
                    "free_bytes": 63 << 30, "local_hit_chunks": 0})
        w.next_beat = time.monotonic() + paced[0]

    mark = [0.0]  # registrations after this time count in dead_seen
    syncing: dict[str, tuple[deque, int]] = {}  # worker → (parts left, next part number)

    def start_sync(w: _Worker) -> None:
        keys = w.keys()
        parts = deque(keys[i:i + SYNC_PART] for i in range(0, len(keys), SYNC_PART))
        first_part = parts.popleft() if parts else []
        w.seq += 1
        syncing[w.name] = (parts, 1)
        sync(w, first_part, 0, not parts)

    def on_reply(w: _Worker, reply: dict) -> None:
        _, type_, _ = w.pending
        w.pending = None
        if reply.get("type") == "error":
            if reply.get("code") == "unknown_worker":
                if w.registered_at > mark[0]:
                    w.dead_seen += 1
                w.known = False
                retry_later(w, time.monotonic())
            return
        if type_ == "heartbeat":
            paced[0] = float(reply.get("heartbeat_interval_s", paced[0]))
            w.backoff.reset()  # registered, synced and heard: up
            if w.state == "resuming":
                w.state = "up"  # it still knows this worker (a sync, if any, comes below)
        if type_ == "register":
            w.known = True
            w.epoch = reply["epoch"]
            w.registered_at = time.time()
            paced[0] = float(reply.get("heartbeat_interval_s", paced[0]))
            w.next_beat = time.monotonic() + paced[0] * random.random()
            start_sync(w)
        elif type_ == "sync":
            parts, number = syncing.get(w.name, (deque(), 0))
            if parts:
                syncing[w.name] = (parts, number + 1)
                sync(w, parts.popleft(), number, not parts)
            else:
                syncing.pop(w.name, None)
                w.state = "up"
        elif type_ in ("heartbeat", "batch") and reply.get("resync"):
            start_sync(w)

    start = time.monotonic()  # workers start over a few seconds, as a fleet's do
    for n, w in enumerate(workers.values()):
        w.retry_at = start + n / REGISTER_RATE
    running = True
    last_scan = [0.0]
    while running:
        now = time.monotonic()
        # commands
        while conn.poll(0):
            command, arg = conn.recv()
            if command == "fill":  # each worker adds ``arg`` new chunks
                for w in workers.values():
                    new = keys_of(w.index, w.generation, arg)
                    w.generation += 1
                    if len(w.pinned) < PINNED:
                        take = PINNED - len(w.pinned)
                        w.pinned += new[:take]
                        new = new[take:]
                    if new:
                        w.blocks.append(new)
                    queue.append((w.name, {"admit": w.pinned + new if w.generation == 1
                                           else new}))
                conn.send(("queued", len(queue)))
            elif command == "stream":
                stream_rate, stream_batch = arg
                conn.send(("streaming", stream_rate))
            elif command == "big_sync":  # the first worker here full-syncs ``arg`` keys
                w = next(iter(workers.values()))
                w.blocks.append(keys_of(w.index, 10**6, arg))
                big_sync = {"worker": w.name, "started": None, "done": None}
                queue.append((w.name, {"sync": True}))
                conn.send(("big_sync", w.name))
            elif command == "status":
                states: dict[str, int] = {}
                for w in workers.values():
                    states[w.state] = states.get(w.state, 0) + 1
                conn.send(("status", {"states": states, "queued": len(queue), "sent": dict(sent),
                                      "interval_s": paced[0],
                                      "dead_seen": sum(w.dead_seen for w in workers.values()),
                                      "big_sync": big_sync,
                                      "keys": sum(len(w.keys()) for w in workers.values())}))
            elif command == "mark":
                mark[0] = arg
                conn.send(("marked", arg))
            elif command == "stop":
                running = False
        # streaming: evict a block's worth of the oldest, admit as many new
        if stream_rate:
            stream_carry += stream_rate * (now - last)
            while stream_carry >= stream_batch and len(queue) < 2 * len(workers):
                w = by_name[f"fw{random.randrange(first, first + count):05d}"]
                if not w.blocks:
                    break
                new = keys_of(w.index, w.generation, stream_batch)
                w.generation += 1
                old = w.blocks.popleft()
                evict, rest = old[:stream_batch], old[stream_batch:]
                if rest:
                    w.blocks.appendleft(rest)
                w.blocks.append(new)
                queue.append((w.name, {"admit": new, "evict": evict}))
                stream_carry -= stream_batch
        last = now
        # queued changes go out when their worker is free and up
        for _ in range(len(queue)):
            name, change = queue.popleft()
            w = by_name[name]
            if w.pending is not None or w.state != "up":
                queue.append((name, change))
                continue
            if change.get("sync"):
                big_sync["started"] = time.time()
                start_sync(w)
            else:
                batch(w, change.get("admit", []), change.get("evict", []))
        # heartbeats, deadlines, re-registration (a scan of every worker: every 20 ms, so that
        # the simulation leaves the CPU to the controller)
        for w in list(workers.values()) if now - last_scan[0] >= 0.02 else ():
            if w.pending is not None:
                if w.unsent is not None:
                    try:
                        w.socket.send(w.unsent, zmq.NOBLOCK)
                        w.unsent = None
                    except zmq.Again:
                        pass
                if now - w.pending[2] > DEADLINE_S.get(w.pending[1], DEFAULT_TIMEOUT_S):
                    sent["timeouts"] += 1  # lost, late, or never sent
                    syncing.pop(w.name, None)
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
        if now - last_scan[0] >= 0.02:
            last_scan[0] = now
        for sock, _ in poller.poll(5):
            w = workers[sock]
            while True:
                try:
                    raw = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                if w.pending is not None and reply.get("id") == w.pending[0]:
                    was_big = big_sync is not None and big_sync["worker"] == w.name and \
                        w.pending[1] == "sync" and big_sync["started"] and not big_sync["done"]
                    on_reply(w, reply)
                    if was_big and w.state == "up":
                        big_sync["done"] = time.time()
    for sock in workers:
        sock.close(linger=0)
    context.term()


# ---------------------------------------------------------------------------- lookup clients
def _lookups(port: int, key_file: str, workers: int, clients: int, rate: float, conn) -> None:
    """Lookups of 16 keys from ``clients`` connections, ``rate`` a second in all (each
    connection waits for its answer before its next), until told to stop; answers
    ("samples", [(unix time, round trip µs, matched)]) on request."""
    key = load_key_file(key_file)
    context = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for _ in range(clients):
        sock = _controller_socket(context, poller, key, port, reconnect_max_ms=500)
        socks.append(sock)
    prompts = [keys_of(w, 0, PINNED) for w in random.Random(1).sample(range(workers),
                                                                      min(workers, 512))]
    outstanding: dict[zmq.Socket, tuple[int, float]] = {}
    samples: list[tuple[float, float, int]] = []
    errors = 0
    ids = iter(range(1, 1 << 62))
    active = False
    gap_s = clients / rate
    next_at = {sock: 0.0 for sock in socks}

    def fire(sock) -> None:
        request_id = next(ids)
        keys = random.choice(prompts)
        try:
            sock.send(protocol.encode(protocol.request("lookup", request_id, namespace=NS,
                                                       keys=keys)), zmq.NOBLOCK)
        except zmq.Again:  # not connected yet (the controller restarting): ask again later
            return
        outstanding[sock] = (request_id, time.perf_counter())

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
                for sock in socks:
                    sock.close(linger=0)
                context.term()
                return
        now = time.perf_counter()
        for sock in socks:
            pending = outstanding.get(sock)
            if pending is None and active and now >= next_at[sock]:
                fire(sock)
                next_at[sock] = max(now, next_at[sock] + gap_s * random.uniform(0.5, 1.5))
            elif pending is not None and now - pending[1] > LOOKUP_TIMEOUT_S:
                errors += 1  # no answer in a worker's deadline
                outstanding.pop(sock)
        for sock, _ in poller.poll(1):
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            pending = outstanding.get(sock)
            if pending is None or reply.get("id") != pending[0]:
                continue
            outstanding.pop(sock)
            if active:
                matched = reply.get("matched", -1) if reply.get("type") == "ok" else -1
                samples.append((time.time(), (time.perf_counter() - pending[1]) * 1e6, matched))


# ---------------------------------------------------------------------------- one controller
class Fleet:
    """A controller (from ``tree``) with simulated workers and lookup clients."""

    def __init__(self, tree: Path, label: str, args: argparse.Namespace, key_file: str,
                 workdir: Path, digests: bool) -> None:
        self.tree, self.label, self.args, self.key_file = tree, label, args, key_file
        self.digests = digests
        self.workdir = workdir
        self.port = _free_port()
        self.controller: subprocess.Popen | None = None
        self.sims: list[tuple[mp.Process, Any]] = []
        self.lookup_proc: mp.Process | None = None
        self.lookup_conn = None
        self.key = load_key_file(key_file)
        self.context = zmq.Context()
        self.client = None

    def start_controller(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        log = open(self.workdir / f"controller-{self.label}.log", "ab")
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "lmshare", "--log-level", "warning", "controller", "--host",
             "127.0.0.1", "--port", str(self.port), "--key-file", self.key_file],
            cwd=self.tree, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.call("ping", timeout_s=0.5)
                return
            except TimeoutError:
                if self.controller.poll() is not None:
                    raise RuntimeError(f"controller exited; see {log.name}") from None

    def call(self, type_: str, timeout_s: float = 30.0, **fields: Any) -> dict:
        if self.client is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, self.key.curve_client())
            sock.connect(f"tcp://127.0.0.1:{self.port}")
            self.client = sock
        self.client.send(protocol.encode(protocol.request(type_, 1, **fields)))
        if not self.client.poll(int(timeout_s * 1000)):
            self.client.close(linger=0)
            self.client = None
            raise TimeoutError(type_)
        return msgpack.unpackb(self.client.recv(), raw=False, strict_map_key=False)

    def timed_stats(self) -> tuple[float, float, int]:
        """(ms for the first page, ms for every page, workers listed)."""
        started = time.perf_counter()
        first = self.call("stats")["stats"]
        first_ms = (time.perf_counter() - started) * 1000
        total = first["workers_total"]
        listed = len(first["workers"])
        while listed < total:
            page = self.call("stats", offset=listed)["stats"]
            if not page["workers"]:
                break
            listed += len(page["workers"])
        return first_ms, (time.perf_counter() - started) * 1000, listed

    def stats(self) -> dict:
        return self.call("stats", limit=1)["stats"]

    def steps(self) -> dict:
        """The controller's loop steps so far, by kind: [count, over 10 ms of CPU] (only a
        controller that counts them says)."""
        return self.call("stats", limit=1).get("steps", {})

    def start_sims(self, first: int, count: int) -> None:
        parent, child = mp.Pipe()
        proc = mp.Process(target=_simulate, args=(first, count, self.port, self.key_file,
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
            self.port, self.key_file, self.args.workers, self.args.clients,
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
            if self.controller is not None:
                self.controller.kill()
                self.controller.wait()
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
        if self.client is not None:
            self.client.close(linger=0)
            self.client = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latency(samples: list) -> dict:
    rtts = [s[1] for s in samples if s[2] >= 0]
    if not rtts:
        return {"count": 0}
    return {"count": len(rtts), "p50_us": percentile(rtts, 0.5), "p99_us": percentile(rtts, 0.99),
            "max_us": max(rtts), "over_10ms": sum(r > 10_000 for r in rtts),
            "hits": sum(1 for s in samples if s[2] == PINNED)}


def wait_for(what: str, condition, timeout_s: float, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except TimeoutError:  # the controller is busy (its answer waits behind the fleet's)
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


def measure(tree: Path, label: str, args: argparse.Namespace, key_file: str,
            workdir: Path, digests: bool) -> dict:
    fleet = Fleet(tree, label, args, key_file, workdir, digests)
    out: dict[str, Any] = {"label": label, "digests": digests}
    try:
        fleet.start_controller()
        pid = fleet.controller.pid
        out["rss_empty"] = rss_bytes(pid)
        # 1. register, timing stats as the fleet grows
        per_sim = -(-args.workers // args.sim_processes)
        bar = Bar(f"[{label}] register {args.workers} workers", args.workers)
        out["stats_ms"] = []
        for i in range(args.sim_processes):
            first = i * per_sim
            count = min(per_sim, args.workers - first)
            fleet.start_sims(first, count)
            target = first + count
            wait_for("registration", lambda t=target: fleet.stats()["workers_total"] >= t,
                     300, 0.5)
            bar.advance(count)
            first_ms, all_ms, listed = fleet.timed_stats()
            out["stats_ms"].append({"workers": target, "first_page_ms": first_ms,
                                    "all_pages_ms": all_ms, "listed": listed})
        bar.close()
        wait_for("every worker up", lambda: all(
            s["states"].get("up", 0) == sum(s["states"].values())
            for s in fleet.sims_call("status")), 300)
        out["rss_registered"] = rss_bytes(pid)
        fleet.start_lookups()
        # 2. index in steps; lookups and RSS after each
        per_worker = args.keys // args.workers
        steps = args.steps
        step_keys = per_worker // steps
        out["curve"] = []
        steps_before = fleet.steps()
        bar = Bar(f"[{label}] index {args.keys:,} chunks", steps)
        for step in range(steps):
            fleet.sims_call("fill", step_keys)
            expected = (step + 1) * step_keys * args.workers
            started = time.monotonic()
            wait_for("chunks indexed", lambda e=expected: fleet.stats()["chunks_indexed"] >= e
                     and all(s["queued"] == 0 for s in fleet.sims_call("status")), 600, 0.5)
            fill_s = time.monotonic() - started
            samples, errors = fleet.lookups_for(args.lookup_s)
            point = {"keys": expected, "rss": rss_bytes(pid), "fill_s": fill_s,
                     "lookup": _latency(samples), "lookup_timeouts": errors}
            out["curve"].append(point)
            bar.advance()
        bar.close()
        out["fill_steps"] = _step_diff(steps_before, fleet.steps())
        indexed = out["curve"][-1]["keys"]
        out["bytes_per_key"] = (out["curve"][-1]["rss"] - out["rss_registered"]) / indexed
        first_ms, all_ms, listed = fleet.timed_stats()
        out["stats_full"] = {"workers": listed, "first_page_ms": first_ms, "all_pages_ms": all_ms}
        # 3. streaming admits and evictions, then a big full sync while they go on
        if not args.restart_only:
            _stream_and_big_sync(fleet, args, out, pid)
        time.sleep(2.0)
        # 4. restart: kill, start again, every worker re-registers and re-syncs
        out["restart"] = _restart(fleet, label, args)
    finally:
        fleet.stop()
    return out


def _stream_and_big_sync(fleet: Fleet, args: argparse.Namespace, out: dict, pid: int) -> None:
    rate = args.stream_rate / 2 / args.sim_processes  # admitted (and as many evicted) each
    fleet.sims_call("stream", (rate, 64))
    steps_before = fleet.steps()
    sent_before = sum(s["sent"]["batch"] for s in fleet.sims_call("status"))
    samples, errors = fleet.lookups_for(args.stream_s)
    sent_after = sum(s["sent"]["batch"] for s in fleet.sims_call("status"))
    out["stream"] = {"lookup": _latency(samples), "lookup_timeouts": errors,
                     "keys_per_s": (sent_after - sent_before) * 128 / args.stream_s,
                     "steps": _step_diff(steps_before, fleet.steps())}
    steps_before = fleet.steps()
    fleet.sims[0][1].send(("big_sync", args.big_sync))
    fleet.sims[0][1].recv()
    fleet.lookup_conn.send(("start", None))
    big = wait_for("the big sync", lambda: (fleet.sims_call("status")[0]["big_sync"] or {})
                   .get("done"), 600, 0.2)
    time.sleep(1.0)
    fleet.lookup_conn.send(("collect", None))
    _, samples, errors = fleet.lookup_conn.recv()
    status = fleet.sims_call("status")[0]["big_sync"]
    during = [s for s in samples if status["started"] <= s[0] <= big + 1.0]
    out["big_sync"] = {"keys": args.big_sync, "seconds": big - status["started"],
                       "lookup": _latency(during), "lookup_timeouts": errors,
                       "rss": rss_bytes(pid), "steps": _step_diff(steps_before, fleet.steps())}
    fleet.sims_call("stream", (0.0, 64))


def _restart(fleet: Fleet, label: str, args: argparse.Namespace) -> dict:
    """Kill the controller, start it again; time the first lookup answered and the index
    complete, count the workers declared dead and the calls the workers made on the way."""
    expected_keys = fleet.stats()["chunks_indexed"]
    sent_before = _sent(fleet)
    fleet.controller.kill()
    fleet.controller.wait()
    if fleet.client is not None:
        fleet.client.close(linger=0)
        fleet.client = None
    restarted = time.time()
    fleet.sims_call("mark", restarted)
    fleet.start_controller()
    ready = time.time()
    pid = fleet.controller.pid
    fleet.lookup_conn.send(("start", None))
    bar = Bar(f"[{label}] restart: re-sync {expected_keys:,} chunks", 100)
    complete = None
    progress = []  # (seconds since the kill, chunks indexed, workers registered)
    deadline = time.monotonic() + args.restart_timeout_s
    while time.monotonic() < deadline:
        try:
            reply = fleet.call("stats", limit=1, timeout_s=5)
        except TimeoutError:
            continue
        now_stats = reply["stats"]
        indexed_now = now_stats["chunks_indexed"]
        progress.append((round(time.time() - restarted, 2), indexed_now,
                         now_stats["workers_total"], reply.get("heartbeat_interval_s")))
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
    stats = fleet.call("stats", limit=1)["stats"]
    dead = sum(1 for e in stats["events"] if e["kind"] == "dead")
    status = fleet.sims_call("status")
    sent_after = _sent(fleet, status)
    return {
        "keys": expected_keys, "ping_s": ready - restarted,
        "first_answer_s": (answered[0][0] - restarted) if answered else None,
        "first_full_hit_s": (full[0][0] - restarted) if full else None,
        "complete_s": (complete - restarted) if complete else None,
        "indexed": stats["chunks_indexed"], "workers": stats["workers_total"],
        "dead_events": dead, "declared_dead_seen_by_workers": sum(s["dead_seen"]
                                                                  for s in status),
        "calls": {k: sent_after.get(k, 0) - sent_before.get(k, 0) for k in sent_after},
        "progress": progress,
        "lookup": _latency(answered), "rss": rss_bytes(pid), "steps": fleet.steps()}


def _sent(fleet: Fleet, status: list | None = None) -> dict:
    """The simulated workers' calls so far, by type (with the calls that got no answer)."""
    total: dict[str, int] = {}
    for s in status if status is not None else fleet.sims_call("status"):
        for kind, n in s["sent"].items():
            total[kind] = total.get(kind, 0) + n
    return total


def baseline_tree(rev: str, workdir: Path) -> Path:
    tree = workdir / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def report(results: list[dict], args: argparse.Namespace) -> str:
    rows = []
    for r in results:
        last = r["curve"][-1]
        if "stream" not in r:  # --restart-only
            r = {**r, "stream": {"keys_per_s": 0, "lookup": {}},
                 "big_sync": {"seconds": 0, "lookup": {}}}
        rows.append([
            r["label"], f"{last['keys']:,}", f"{r['bytes_per_key']:.0f} B",
            f"{last['rss'] / 2**30:.2f} GiB",
            f"{last['lookup'].get('p50_us', 0):.0f} / {last['lookup'].get('p99_us', 0):.0f} / "
            f"{last['lookup'].get('max_us', 0) / 1000:.1f} ms",
            f"{r['stream']['keys_per_s']:,.0f}",
            f"{r['stream']['lookup'].get('p99_us', 0):.0f} / "
            f"{r['stream']['lookup'].get('max_us', 0) / 1000:.1f} ms",
            f"{r['big_sync']['seconds']:.1f} s; {r['big_sync']['lookup'].get('p99_us', 0):.0f} / "
            f"{r['big_sync']['lookup'].get('max_us', 0) / 1000:.1f} ms",
            f"{r['stats_full']['first_page_ms']:.0f} / {r['stats_full']['all_pages_ms']:.0f} ms",
            _restart_cell(r["restart"])])
    text = table(["controller", "chunks", "index B/key", "RSS", "lookup p50/p99 µs / max",
                  "stream keys/s", "lookup p99 µs / max, streaming",
                  f"{args.big_sync:,}-key sync: time; lookup p99 / max",
                  "stats 1st page / all", "restart: ping / lookup answered / full hit / complete; dead"], rows)
    text += "\n\n" + table(
        ["controller", "phase", "loop steps over 10 ms of CPU (of all), by kind"],
        [[r["label"], phase, _steps_cell((r.get(key) or {}).get("steps") if key != "fill" else
                                         r.get("fill_steps"))]
         for r in results for phase, key in (("indexing", "fill"), ("streaming", "stream"),
                                             ("big sync", "big_sync"), ("since restart",
                                                                        "restart"))])
    text += "\n\n" + table(
        ["controller", *[f"stats at {p['workers']:,} workers (1st page / all)"
                         for p in results[0]["stats_ms"]]],
        [[r["label"], *[f"{p['first_page_ms']:.0f} / {p['all_pages_ms']:.0f} ms"
                        for p in r["stats_ms"]]] for r in results])
    text += "\n\n" + table(
        ["controller", "workers' calls from the kill on (timeouts: not answered within their deadline)",
         "restart: seconds since the kill → chunks indexed, workers registered, heartbeat "
         "interval asked"],
        [[r["label"], ", ".join(f"{k} {v:,}" for k, v in r["restart"]["calls"].items() if v),
          "; ".join(f"{t:.1f} s → {k:,}, {w:,}, {i or '—'} s" for t, k, w, i in
                    r["restart"]["progress"][::max(1, len(r["restart"]["progress"]) // 8)])]
         for r in results])
    return text


def _steps_cell(steps: dict | None) -> str:
    if not steps:
        return "not counted"
    return ", ".join(f"{kind} {slow} ({count:,})" for kind, (count, slow) in
                     sorted(steps.items(), key=lambda kv: -kv[1][0]))


def _restart_cell(r: dict) -> str:
    def s(v):
        return "—" if v is None else f"{v:.1f} s"
    return (f"{s(r['ping_s'])} / {s(r['first_answer_s'])} / {s(r['first_full_hit_s'])} / {s(r['complete_s'])}; "
            f"{r['declared_dead_seen_by_workers']} declared dead")


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in data["results"]:
        keys = [p["keys"] / 1e6 for p in r["curve"]]
        ax1.plot(keys, [p["lookup"].get("p99_us", 0) for p in r["curve"]], marker="o",
                 label=f"{r['label']} p99")
        ax1.plot(keys, [p["lookup"].get("p50_us", 0) for p in r["curve"]], marker=".",
                 linestyle="--", label=f"{r['label']} p50")
        ax2.plot(keys, [p["rss"] / 2**30 for p in r["curve"]], marker="o", label=r["label"])
    ax1.axhline(500, color="grey", linewidth=0.8, linestyle=":")
    ax1.set(xlabel="indexed chunks (millions)", ylabel="lookup round trip (µs)",
            title=f"16-key lookups, {data['workers']:,} workers heartbeating")
    ax2.axhline(1.5, color="grey", linewidth=0.8, linestyle=":")
    ax2.set(xlabel="indexed chunks (millions)", ylabel="controller RSS (GiB)",
            title="controller memory")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=10_000)
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=10, help="indexing steps (points of the plot)")
    p.add_argument("--sim-processes", type=int, default=4)
    p.add_argument("--clients", type=int, default=16, help="lookup client connections")
    p.add_argument("--lookup-rate", type=float, default=400.0, help="lookups a second in all")
    p.add_argument("--lookup-s", type=float, default=3.0, help="lookup time per step")
    p.add_argument("--stream-rate", type=int, default=100_000,
                   help="admitted plus evicted keys per second while streaming")
    p.add_argument("--stream-s", type=float, default=15.0)
    p.add_argument("--big-sync", type=int, default=1_000_000, help="keys of the one full sync")
    p.add_argument("--restart-timeout-s", type=float, default=120.0)
    p.add_argument("--restart-settle-s", type=float, default=10.0,
                   help="heartbeats watched after the index is complete (workers declared "
                        "dead show within --heartbeat-timeout)")
    p.add_argument("--restart-only", action="store_true",
                   help="register and index, then only the restart (no streaming, no big sync)")
    p.add_argument("--baseline", default=BASELINE, help="git revision to compare ('' = none)")
    p.add_argument("--baseline-digests", action="store_true",
                   help="the baseline's workers send digests too (it then indexes ~5k keys/s "
                        "past 1M digest records)")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[str, dict]:
    args = parse(argv if argv is not None else [])
    mp.set_start_method("spawn", force=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="lmshare-fleet-") as tmp:
        workdir = Path(tmp)
        key_file = str(workdir / "cluster.key")
        generate_key_file(key_file)
        trees = [(ROOT, "compact index (now)", True)]
        if args.baseline:
            # (its digest records cost ~220 µs an admit once full, a bug fixed with the compact
            # index: with digests it would not get far past 1M chunks, so it runs without)
            trees.append((baseline_tree(args.baseline, workdir), f"dict index ({args.baseline})",
                          args.baseline_digests))
        for tree, label, digests in trees:
            results.append(measure(tree, label, args, key_file, workdir, digests))
    data = {"workers": args.workers, "keys": args.keys, "args": vars(args), "results": results}
    return report(results, args), data


if __name__ == "__main__":
    import signal

    # a SIGTERM (a timeout) unwinds through the finally blocks that stop the controllers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    text, data = run(sys.argv[1:])
    name = "control_plane"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    plot(data, str(RESULTS / f"{name}.png"))
    print(header("python -m benchmarks.control_plane " + " ".join(sys.argv[1:])))
    print(text)
