"""Start a controller and workers as real OS processes through the ``lmshare`` CLI, on loopback.

Used by ``lmshare demo``, the end-to-end tests and the benchmarks: the same commands operators
run. Every wait has a deadline; :meth:`LocalCluster.stop` leaves no process behind.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmshare.control import ControllerClient
from lmshare.credentials import ClusterKey, generate_key_file, load_key_file
from lmshare.errors import ControllerUnavailable, LMShareError, RemoteError, WorkerUnavailable

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


STOP_MARGIN_S = 5.0  # past a worker's own shutdown budget: the interpreter's exit


def worker_stop_timeout(args: Sequence[str]) -> float:
    """How long to wait for a worker started with ``args`` to leave after SIGTERM before
    killing it: its own budget (:attr:`WorkerConfig.shutdown_budget_s` for the timeouts and
    controllers ``args`` give) and a margin."""
    from lmshare.worker.config import WorkerConfig

    def option(name: str, default: float) -> float:
        return float(args[args.index(name) + 1]) if name in args[:-1] else default

    shards = [group.split(",") for group in args[args.index("--controller") + 1].split(";")] \
        if "--controller" in args[:-1] else [[""]]
    config = WorkerConfig(
        "127.0.0.1", 1, 1 << 20, name="budget",
        drain_timeout_s=option("--drain-timeout", WorkerConfig.drain_timeout_s),
        fetch_timeout_s=option("--fetch-timeout", WorkerConfig.fetch_timeout_s),
        standby_controllers=tuple(("127.0.0.1", 1) for _ in shards[0][1:]),
        shard_controllers=tuple(tuple(("127.0.0.1", 1) for _ in group) for group in shards[1:]))
    return config.shutdown_budget_s + STOP_MARGIN_S


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    process: subprocess.Popen
    log_path: Path
    stop_timeout_s: float = 10.0  # what stop() allows it after SIGTERM

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
        return self.kill()

    def kill(self) -> int | None:
        if self.alive():
            self.process.kill()
        try:
            return self.process.wait(5)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class LocalCluster:
    """A controller and workers on this host. Use as a context manager."""

    controller_port: int = 0
    controller_host: str = "127.0.0.1"
    controllers: str = ""  # "HOST:PORT,HOST:PORT": several controllers elected through etcd
    heartbeat_timeout_s: float = 3.0
    runtime_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lmshare-")))
    python: str = sys.executable
    controller: ManagedProcess | None = None
    # with key-range shards (start_shards): the controllers of shards 1..N-1, and every
    # shard's port (shard 0's is controller_port)
    shard_controllers: list[ManagedProcess] = field(default_factory=list)
    shard_ports: list[int] = field(default_factory=list)
    workers: dict[str, ManagedProcess] = field(default_factory=dict)
    routers: dict[str, ManagedProcess] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    new_session: bool = False  # children in their own session: a terminal's Ctrl-C skips them
    # the cluster key every process gets (LMSHARE_KEY_FILE); "" = a new one in runtime_dir;
    # None = run everything --insecure
    key_file: str | None = ""
    key: ClusterKey | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.runtime_dir = Path(self.runtime_dir)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)
        if not self.controller_port:
            self.controller_port = free_port()
        if self.key_file == "":
            path = self.runtime_dir / "cluster.key"
            self.key = load_key_file(path) if path.exists() else generate_key_file(path)
            self.key_file = str(path)
        elif self.key_file is not None:
            self.key = load_key_file(self.key_file)

    @property
    def controller_address(self) -> str:
        """What workers are given as --controller (``controllers`` when several)."""
        return self.controllers or f"{self.controller_host}:{self.controller_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LMSHARE_RUNTIME_DIR"] = str(self.runtime_dir)
        env.pop("LMSHARE_KEY_FILE", None)
        if self.key_file:
            env["LMSHARE_KEY_FILE"] = self.key_file
        env.update(self.extra_env)
        return env

    def _security_args(self) -> list[str]:
        return [] if self.key_file else ["--insecure"]

    def _spawn(self, name: str, args: list[str], prefix: tuple[str, ...] = ()) -> ManagedProcess:
        log_path = self.runtime_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen([*prefix, self.python, "-m", "lmshare", *args], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.env(), start_new_session=self.new_session)
        return ManagedProcess(name, args, process, log_path)

    def start_controller(self, *extra: str, timeout_s: float = 15.0,
                         prefix: tuple[str, ...] = (), wait: bool = True) -> ManagedProcess:
        """Start the controller (``prefix``, e.g. ``ip netns exec NS``, runs it elsewhere)."""
        args = ["controller", "--host", self.controller_host, "--port", str(self.controller_port),
                "--heartbeat-timeout", str(self.heartbeat_timeout_s), *self._security_args(),
                *extra]
        self.controller = self._spawn("controller", args, prefix)
        if wait:
            self.wait_for_controller(timeout_s)
        return self.controller

    def start_shards(self, count: int, *extra: str,
                     timeout_s: float = 15.0) -> list[ManagedProcess]:
        """The controllers of ``count`` key-range shards, each started with ``--shard K/N``
        (shard 0 on ``controller_port``, as :meth:`start_controller` starts it); workers
        started next are given all of them, in order."""
        self.shard_ports = [self.controller_port, *(free_port() for _ in range(count - 1))]
        self.controllers = ";".join(f"{self.controller_host}:{port}" for port in self.shard_ports)
        started = [self.start_controller("--shard", f"0/{count}", *extra, timeout_s=timeout_s)]
        for index in range(1, count):
            args = ["controller", "--host", self.controller_host,
                    "--port", str(self.shard_ports[index]), "--shard", f"{index}/{count}",
                    "--heartbeat-timeout", str(self.heartbeat_timeout_s),
                    *self._security_args(), *extra]
            process = self._spawn(f"controller-shard{index}", args)
            self.shard_controllers.append(process)
            started.append(process)
            self.wait_for_controller(timeout_s, index)
        return started

    def wait_for_controller(self, timeout_s: float = 15.0, shard: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.controller_client(timeout_s=0.5, shard=shard)
        process = self.controller if shard == 0 else self.shard_controllers[shard - 1]
        try:
            while True:
                if process is not None and not process.alive():
                    raise LMShareError(f"controller exited: {process.log_text()[-2000:]}")
                try:
                    client.call("ping")
                    return
                except ControllerUnavailable:
                    if time.monotonic() > deadline:
                        raise
        finally:
            client.close()

    def start_worker(self, name: str, cache_size: str = "64MiB", *extra: str,
                     wait: bool = True, timeout_s: float = 15.0,
                     prefix: tuple[str, ...] = ()) -> ManagedProcess:
        args = ["worker", "--controller", self.controller_address, "--name", name,
                "--cache-size", cache_size, *self._security_args(), *extra]
        worker = self._spawn(f"worker-{name}", args, prefix)
        worker.stop_timeout_s = worker_stop_timeout(args)
        self.workers[name] = worker
        if wait:
            self.wait_for_worker(name, timeout_s)
        return worker

    def wait_for_worker(self, name: str, timeout_s: float = 15.0) -> None:
        """Wait until the worker answers locally and is registered with the controller."""
        from lmshare.client import Client

        deadline = time.monotonic() + timeout_s
        worker = self.workers[name]
        while True:
            if not worker.alive():
                raise LMShareError(f"worker {name} exited: {worker.log_text()[-2000:]}")
            try:
                with Client(worker=name, endpoint=self.worker_endpoint(name), timeout_s=0.5) as c:
                    if c.stats()["registered"]:
                        return
            except (WorkerUnavailable, RemoteError, LMShareError):
                pass
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"worker {name} did not become ready in {timeout_s}s: "
                                        f"{worker.log_text()[-2000:]}")
            time.sleep(0.05)

    def start_router(self, port: int, *backends: str, policy: str = "prefix+load",
                     extra: Sequence[str] = (), name: str = "router",
                     timeout_s: float = 30.0) -> ManagedProcess:
        """``lmshare router`` on ``port`` in front of ``backends`` (``URL[=WORKER]``), asking this
        cluster's controller; returns once it listens."""
        args = ["router", "--port", str(port), "--policy", policy, *self._security_args(),
                *(a for b in backends for a in ("--backend", b)), *extra]
        if self.controller is not None or self.controllers:
            args += ["--controller", self.controller_address]
        router = self._spawn(name, args)
        self.routers[name] = router
        deadline = time.monotonic() + timeout_s
        while "lmshare router (" not in router.log_text():
            if not router.alive():
                raise LMShareError(f"router exited: {router.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise LMShareError(f"router did not start in {timeout_s}s: "
                                   f"{router.log_text()[-2000:]}")
            time.sleep(0.05)
        return router

    def controller_client(self, timeout_s: float = 2.0, shard: int = 0) -> ControllerClient:
        """A client of the controller (of shard ``shard``) holding this cluster's key."""
        port = self.shard_ports[shard] if shard else self.controller_port
        return ControllerClient("127.0.0.1", port, timeout_s=timeout_s, key=self.key)

    def worker_endpoint(self, name: str) -> str:
        return f"ipc://{self.runtime_dir / f'worker-{name}.sock'}"

    def client(self, name: str, timeout_s: float = 10.0):
        """A :class:`lmshare.Client` of worker ``name``."""
        from lmshare.client import Client

        return Client(endpoint=self.worker_endpoint(name), timeout_s=timeout_s)

    def stats(self):
        """The controller's ClusterStats."""
        from lmshare.stats import fetch_cluster_stats

        client = self.controller_client(timeout_s=2.0)
        try:
            return fetch_cluster_stats(client)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop routers and workers (gracefully), then the controller. Kills what does not stop
        in time."""
        for router in self.routers.values():
            router.terminate(timeout_s=10)
        for worker in self.workers.values():
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            worker.terminate(timeout_s=worker.stop_timeout_s)  # its own shutdown budget
        for controller in [self.controller, *self.shard_controllers]:
            if controller is not None:
                controller.terminate(timeout_s=10)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
