"""``lmshare demo``: a real local cluster, synthetic long-document QA traffic, a live view.

The controller and the workers are separate OS processes started through the CLI (as an
operator would), each in its own session with a private runtime directory. A background
workload plays vLLM instances behind a load balancer: every request is a shared system prompt +
one of a stream of shared documents + a fresh question, lands on a random worker, looks the
prefix up, reads the hit (fetched from a peer when another worker holds it), verifies its bytes,
and stores the chunks it had to "recompute". Ctrl-C, ``q``, SIGTERM or ``--duration`` stop it;
stopping leaves no process, socket or shared-memory segment behind.

This module is the body of a CLI command: it prints progress to the terminal.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmshare.client import Client
from lmshare.control import ControllerClient
from lmshare.errors import ConfigError, LMShareError
from lmshare.keys import ModelSignature, signature_keys
from lmshare.local_cluster import LocalCluster
from lmshare.shm import shm_dir
from lmshare.signals import SignalLatch
from lmshare.stats import ClusterStats, fetch_cluster_stats
from lmshare.units import format_size, parse_size

log = logging.getLogger(__name__)

#: The demo's model: Qwen2.5-0.5B's KV layout, so chunk sizes are those of a real model.
LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 24, 2, 64, 2
SIGNATURE = ModelSignature(model="Qwen/Qwen2.5-0.5B-Instruct", kv_dtype="bfloat16",
                           kv_layout=f"layers={LAYERS},kv_heads={KV_HEADS},head_dim={HEAD_DIM}",
                           chunk_tokens=256, tenant="lmshare-demo")
#: K and V, every layer, every KV head: 3 MiB per 256-token chunk.
CHUNK_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES * SIGNATURE.chunk_tokens
VOCAB = 151_000
READY_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------- the workload
class Documents:
    """A stream of shared documents: a new one every ``1 / per_s`` seconds, recent ones hot."""

    def __init__(self, per_s: float, seed: int, chunk_tokens: int) -> None:
        self.per_s = per_s
        self.seed = seed
        self.chunk_tokens = chunk_tokens
        self._started = time.monotonic()
        self._cache: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        rng = random.Random(seed)
        self.system_prompt = [rng.randrange(VOCAB) for _ in range(chunk_tokens)]

    def newest(self) -> int:
        return 4 + int((time.monotonic() - self._started) * self.per_s)

    def pick(self, rng: random.Random) -> int:
        """A document id: the newest is the most likely, popularity fades with age."""
        return max(0, self.newest() - int(rng.expovariate(1 / 3)))

    def tokens(self, doc: int) -> list[int]:
        """System prompt + document ``doc``: 3-8 full chunks and a short partial tail."""
        if doc in self._cache:
            self._cache.move_to_end(doc)
            return self._cache[doc]
        rng = random.Random(f"{self.seed}:{doc}")
        length = rng.randint(3, 8) * self.chunk_tokens + rng.randrange(self.chunk_tokens // 4)
        tokens = self.system_prompt + [rng.randrange(VOCAB) for _ in range(length)]
        self._cache[doc] = tokens
        while len(self._cache) > 64:
            self._cache.popitem(last=False)
        return tokens


@dataclass
class WorkloadCounters:
    requests: int = 0
    local_chunks: int = 0
    peer_chunks: int = 0
    stored_chunks: int = 0
    verified_chunks: int = 0
    corrupt_chunks: int = 0
    errors: int = 0
    last_error: str = ""
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))


class Workload:
    """Synthetic long-document QA traffic through :class:`lmshare.Client`, at a bounded rate."""

    def __init__(self, clients: dict[str, Client], rate: float, seed: int | None = None,
                 threads: int = 2) -> None:
        self.clients = clients
        self.rate = rate
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.threads = max(1, min(threads, len(clients)))
        self.documents = Documents(per_s=rate / 5, seed=self.seed,
                                   chunk_tokens=SIGNATURE.chunk_tokens)
        self.namespace = SIGNATURE.namespace()
        self._block = memoryview(os.urandom(CHUNK_BYTES + (1 << 20)))
        self.counters = WorkloadCounters()
        self._lock = threading.Lock()
        self._docs_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = time.monotonic()

    def chunk_bytes(self, key: bytes) -> memoryview:
        """The (random, but fixed per key) KV bytes of the chunk named ``key``."""
        offset = int.from_bytes(key[:8], "little") % (len(self._block) - CHUNK_BYTES)
        return self._block[offset:offset + CHUNK_BYTES]

    def request(self, rng: random.Random) -> None:
        """One request: lookup, read the hit (verifying it), store the chunks that missed."""
        worker = rng.choice(sorted(self.clients))
        client = self.clients[worker]
        with self._docs_lock:
            doc = self.documents.pick(rng)
            tokens = self.documents.tokens(doc)
        question = [rng.randrange(VOCAB) for _ in range(rng.randint(16, SIGNATURE.chunk_tokens // 2))]
        keys = signature_keys(SIGNATURE, tokens + question)
        local, peer = client.lookup_keys(self.namespace, keys)
        held = verified = corrupt = local_hits = peer_hits = 0
        if local + peer:
            with client.acquire_keys(self.namespace, keys) as hit:
                held, local_hits, peer_hits = len(hit), hit.local_chunks, hit.peer_chunks
                for i in range(held):
                    if hit.read(i) == bytes(self.chunk_bytes(keys[i])):
                        verified += 1
                    else:
                        corrupt += 1
        stored = client.put_keys(self.namespace, keys[held:],
                                 [self.chunk_bytes(k) for k in keys[held:]])
        with self._lock:
            c = self.counters
            c.requests += 1
            c.local_chunks += local_hits
            c.peer_chunks += peer_hits
            c.stored_chunks += stored
            c.verified_chunks += verified
            c.corrupt_chunks += corrupt
            c.recent.append(time.monotonic())
        if corrupt:
            log.error("%d chunks read through %s did not match what was stored", corrupt, worker)

    def _run(self, index: int, stop: threading.Event) -> None:
        rng = random.Random(f"{self.seed}:thread:{index}")
        interval = self.threads / self.rate
        next_at = time.monotonic() + rng.random() * interval
        while not stop.is_set():
            if stop.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at = max(next_at + interval, time.monotonic() - 1.0)  # no catch-up bursts
            try:
                self.request(rng)
            except LMShareError as exc:
                with self._lock:
                    self.counters.errors += 1
                    self.counters.last_error = str(exc)[:120]
                log.debug("demo request failed: %s", exc)
                stop.wait(0.2)

    def start(self, stop: threading.Event) -> Workload:
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, args=(index, stop),
                                      name=f"lmshare-demo-load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def requests_per_s(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self.counters.recent if now - t <= window_s]
        span = min(window_s, now - self.started)
        return len(recent) / span if span > 0 else 0.0

    def summary(self) -> str:
        """One line: what the workload did so far."""
        c = self.counters
        line = (f"demo {self.requests_per_s():.1f} req/s · {c.requests:,} req · read "
                f"{c.local_chunks:,} local + {c.peer_chunks:,} peer chunks · "
                f"{c.stored_chunks:,} stored · {c.verified_chunks:,} verified")
        if c.corrupt_chunks:
            line += f" · {c.corrupt_chunks} CORRUPT"
        if c.errors:
            line += f" · {c.errors} errors (last: {c.last_error})"
        return line


# ---------------------------------------------------------------------- the cluster
def _check_shm_space(workers: int, cache_bytes: int) -> None:
    directory = shm_dir()
    try:
        stat = os.statvfs(directory)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if workers * cache_bytes > free:
        raise ConfigError(f"{workers} workers × {format_size(cache_bytes)} does not fit in the "
                          f"{format_size(free)} free in {directory}; use fewer --workers or a "
                          "smaller --cache-size")


def _wait_for_workers(cluster: LocalCluster, names: list[str], stop: threading.Event,
                      timeout_s: float) -> dict[str, Client]:
    """Clients of every worker once each is registered; raises with the worker's log if one
    exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    clients: dict[str, Client] = {}
    try:
        while len(clients) < len(names):
            if stop.is_set():
                raise KeyboardInterrupt
            for name in names:
                if name in clients:
                    continue
                process = cluster.workers[name]
                if not process.alive():
                    raise LMShareError(f"worker {name} exited during start-up:\n"
                                       f"{process.log_text()[-1500:]}")
                try:
                    client = cluster.client(name, timeout_s=0.5)
                except LMShareError:
                    continue
                try:
                    registered = client.stats()["registered"]
                except LMShareError:
                    registered = False
                if registered:
                    client.close()
                    clients[name] = cluster.client(name, timeout_s=10.0)
                else:
                    client.close()
            if len(clients) < len(names):
                if time.monotonic() > deadline:
                    missing = [n for n in names if n not in clients]
                    raise LMShareError(f"workers {', '.join(missing)} did not register within "
                                       f"{timeout_s:.0f}s; logs in {cluster.runtime_dir}")
                time.sleep(0.1)
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    return clients


def _stop_cluster(cluster: LocalCluster) -> list[str]:
    """SIGTERM the workers, then the controller (SIGKILL after the deadlines); remove shared
    memory of any worker that had to be killed. Returns what was left and cleaned up."""
    pids = [w.process.pid for w in cluster.workers.values()]
    cluster.stop()
    leftovers = []
    directory = shm_dir()
    for pid in pids:
        for path in directory.glob(f"lmshare-{pid}-*"):
            path.unlink(missing_ok=True)
            leftovers.append(str(path))
    for process in [*cluster.workers.values(), cluster.controller]:
        if process is not None and process.alive():
            process.kill()
            leftovers.append(f"process {process.name} (pid {process.process.pid})")
    return leftovers


class _WarningBuffer(logging.Handler):
    """Keeps the last warnings while the dashboard owns the screen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=5)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def _summary_line(stats: ClusterStats | None, workload: Workload, elapsed: float) -> str:
    if stats is None:
        return f"[{elapsed:6.1f}s] controller not answering · {workload.summary()}"
    local, peer, miss = stats.hit_rates()
    return (f"[{elapsed:6.1f}s] workers {stats.count('alive')} alive · chunks "
            f"{stats.chunks_indexed:,} ({stats.multi_holder_chunks:,} on >1 worker) · "
            f"{format_size(stats.bytes_cached)} cached · hits local {local:.0%} peer {peer:.0%} "
            f"miss {miss:.0%} · {workload.summary()}")


def _print_summaries(controller: ControllerClient, workload: Workload, stop: threading.Event,
                     every_s: float = 2.0) -> None:
    started = time.monotonic()
    while not stop.wait(every_s):
        try:
            stats = fetch_cluster_stats(controller)
        except LMShareError:
            stats = None
        print(_summary_line(stats, workload, time.monotonic() - started), flush=True)


# ---------------------------------------------------------------------- the command
def run_demo(args: argparse.Namespace,
             dashboard: Callable[..., int] | None = None) -> int:
    """Run the demo until q / Ctrl-C / SIGTERM / ``--duration``. ``dashboard`` is
    :func:`lmshare.dashboard.run_dashboard` (passed in by the CLI: the core does not import
    the dashboard); without it, or with ``--no-dashboard``, a summary line is printed instead."""
    workers = int(args.workers)
    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers {workers}: choose 1 to 64")
    cache_bytes = parse_size(getattr(args, "cache_size", "256MiB"))
    if cache_bytes < 4 * CHUNK_BYTES:
        raise ConfigError(f"--cache-size {format_size(cache_bytes)} is too small for the demo's "
                          f"{format_size(CHUNK_BYTES)} chunks; use at least 64MiB")
    rate = float(getattr(args, "rate", 10.0))
    if not 0 < rate <= 1000:
        raise ConfigError(f"--rate {rate}: choose 0 < rate <= 1000 requests per second")
    duration = args.duration
    use_dashboard = dashboard is not None and not args.no_dashboard and sys.stdout.isatty()
    _check_shm_space(workers, cache_bytes)

    stop = threading.Event()
    signals = SignalLatch(stop=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP), reload=()).install()
    signals.relay(stop)
    cluster = LocalCluster(controller_port=args.port or 0, heartbeat_timeout_s=3.0,
                           new_session=True, key_file=getattr(args, "key_file", None) or "")
    names = [f"worker-{i + 1}" for i in range(workers)]
    clients: dict[str, Client] = {}
    workload: Workload | None = None
    timer: threading.Timer | None = None
    failed = False
    warnings = _WarningBuffer()
    try:
        print(f"lmshare demo: starting a controller on {cluster.controller_address} and "
              f"{workers} workers with {format_size(cache_bytes)} each "
              f"(logs in {cluster.runtime_dir})", flush=True)
        cluster.start_controller("--heartbeat-interval", "0.5", timeout_s=READY_TIMEOUT_S)
        for name in names:
            cluster.start_worker(name, str(cache_bytes), "--fetch-timeout", "5", wait=False)
        clients = _wait_for_workers(cluster, names, stop, READY_TIMEOUT_S)
        workload = Workload(clients, rate).start(stop)
        print(f"lmshare demo: {workers} workers registered; traffic at {rate:g} req/s "
              f"({format_size(CHUNK_BYTES)} chunks of {SIGNATURE.chunk_tokens} tokens)"
              + ("; press q or Ctrl-C to stop" if use_dashboard else "; Ctrl-C to stop"),
              flush=True)
        if duration:
            timer = threading.Timer(duration, stop.set)
            timer.daemon = True
            timer.start()
        deadline = time.monotonic() + duration if duration else None

        def footer() -> str:
            assert workload is not None
            left = f"ends in {deadline - time.monotonic():.0f}s · " if deadline else ""
            return left + workload.summary()

        if use_dashboard:
            root = logging.getLogger()
            saved = root.handlers[:]
            root.handlers = [warnings]
            try:
                dashboard(cluster.controller_address, stop=stop, footer=footer,
                          key=cluster.key)
            finally:
                root.handlers = saved
        else:
            controller = cluster.controller_client(2.0)
            try:
                _print_summaries(controller, workload, stop)
            finally:
                controller.close()
    except KeyboardInterrupt:
        pass
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        if timer is not None:
            timer.cancel()
        print("lmshare demo: stopping workers and controller …", flush=True)
        if workload is not None:
            workload.join(timeout_s=15)
        for client in clients.values():
            client.close()
        leftovers = _stop_cluster(cluster)
        signals.restore()
        for line in warnings.lines:
            print(f"  {line}", file=sys.stderr)
        if leftovers:
            print(f"lmshare demo: cleaned up after processes that did not stop in time: "
                  f"{', '.join(leftovers)}", file=sys.stderr)
        if failed:
            print(f"lmshare demo: logs kept in {cluster.runtime_dir}", file=sys.stderr)
        else:
            shutil.rmtree(cluster.runtime_dir, ignore_errors=True)
    if workload is not None:
        print(f"lmshare demo: done. {workload.summary()}", flush=True)
        if workload.counters.corrupt_chunks:
            return 1
    return 0
