"""Worker settings, with the defaults an operator gets from ``lmshare worker``."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

from lmshare.credentials import ClusterKey
from lmshare.errors import ConfigError
from lmshare.pool import DEFAULT_SLAB_BYTES

KNOWN_TRANSPORTS = {"shm", "ucx", "tcp"}


def resolve_transports(text: str) -> tuple[str, ...]:
    """``auto`` → shm, ucx where it pays (installed and RDMA hardware present), tcp; otherwise
    the comma-separated list as given (checked by WorkerConfig)."""
    if text.strip() == "auto":
        from lmshare.transports.ucx import ucx_worthwhile

        try:
            ucx = ucx_worthwhile()
        except Exception:  # a broken UCX install must not stop the worker
            ucx = False
        return ("shm", "ucx", "tcp") if ucx else ("shm", "tcp")
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if "ucx" in names:
        from lmshare.transports.ucp import ucx_available

        if not ucx_available():
            raise ConfigError("transport ucx needs UCX: pip install 'lmshare[ucx]' "
                              "(or leave ucx out of --transports)")
    return names


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def host_identity() -> str:
    """Same value for every process on one host (boot), different across hosts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass
class WorkerConfig:
    controller_host: str
    controller_port: int
    cache_bytes: int
    name: str = field(default_factory=default_name)
    slab_bytes: int = DEFAULT_SLAB_BYTES
    host: str = ""  # data-plane address; "" = the local address that reaches the controller
    port: int = 0  # data-plane port; 0 = any free port (peers learn it from the controller)
    endpoint: str = ""  # local client endpoint; "" = ipc socket named after the worker
    connect_timeout_s: float = 5.0
    rpc_timeout_s: float = 1.0
    fetch_timeout_s: float = 5.0
    checksum: bool = False
    max_lease_s: float = 300.0
    drain_timeout_s: float = 10.0  # leaving: hand chunks only it holds to peers this long (0: no)
    client_threads: int = 4
    transports: tuple[str, ...] = ("shm", "tcp")  # what this worker offers and uses, best first
    # more controllers (etcd-elected leader and standbys), tried in order after the first
    standby_controllers: tuple[tuple[str, int], ...] = ()
    # the controllers of shards 1..N-1 when the key space is in shards (lmshare/shards.py),
    # each with its standbys; the controllers above are shard 0's
    shard_controllers: tuple[tuple[tuple[str, int], ...], ...] = ()
    key: ClusterKey | None = None  # the cluster key (control and data plane); None = insecure
    # record each chunk's digest as it is stored and check fetched chunks against the record
    digests: bool = True
    # encrypt every TCP data-plane connection this worker serves or opens (AES-256-GCM)
    encrypt: bool = False
    # per tenant ("" = the cluster key's chunks): bytes it may hold in this pool, and how long
    # a chunk it stores stays (lmshare/tenancy.py; the controller may tighten both)
    tenant_quotas: dict[str, int] = field(default_factory=dict)
    tenant_ttls: dict[str, float] = field(default_factory=dict)

    @property
    def controller_addresses(self) -> list[tuple[str, int]]:
        """Shard 0's controllers (the only shard's, without shards)."""
        return [(self.controller_host, self.controller_port), *self.standby_controllers]

    @property
    def shard_addresses(self) -> list[list[tuple[str, int]]]:
        """Each shard's controllers, in shard order."""
        return [self.controller_addresses, *(list(group) for group in self.shard_controllers)]

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or len(self.name) > 100:
            raise ConfigError(f"worker name {self.name!r} must be 1-100 characters without '/'")
        drain = self.drain_timeout_s
        if not (isinstance(drain, (int, float)) and math.isfinite(drain) and drain >= 0):
            raise ConfigError(f"drain timeout must be a finite number of seconds, 0 or more "
                              f"(0: leave without handing chunks to peers), not {drain!r}")
        for option in ("connect_timeout_s", "rpc_timeout_s", "fetch_timeout_s", "max_lease_s"):
            value = getattr(self, option)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{option.removesuffix('_s').replace('_', ' ')} must be a "
                                  f"finite number of seconds above 0, not {value!r}")
        if self.cache_bytes <= 0 or self.slab_bytes <= 0 or self.client_threads <= 0:
            raise ConfigError("cache size, slab size and client threads must be above 0")
        unknown = set(self.transports) - KNOWN_TRANSPORTS
        if unknown:
            raise ConfigError(f"unknown transport(s) {sorted(unknown)}; choose from "
                              f"{sorted(KNOWN_TRANSPORTS)} (tcp is always on)")
        if self.encrypt and self.key is None:
            raise ConfigError("--encrypt needs a cluster key (--key-file): keys derived from "
                              "no secret would protect nothing; drop --insecure")
        from lmshare.shards import MAX_SHARDS

        if len(self.shard_controllers) >= MAX_SHARDS or not all(self.shard_controllers):
            raise ConfigError(f"name 1 to {MAX_SHARDS} controller shards, each with at least "
                              "one controller")
        if "tcp" not in self.transports:
            self.transports = (*self.transports, "tcp")

    @property
    def peer_drain_s(self) -> float:
        """Leaving: how long peers' reads in flight may still finish."""
        return max(1.0, self.drain_timeout_s)

    @property
    def shutdown_budget_s(self) -> float:
        """The longest a worker takes to leave after SIGTERM, each step at its own deadline: the
        hand-off of chunks only it holds, deregistering, peers' reads in flight, local requests
        in flight (an acquire's peer fetch). A supervisor (``LocalCluster``, systemd's
        ``TimeoutStopSec``, Kubernetes' grace period) should wait this long before SIGKILL."""
        from lmshare.worker import control_link, local_server

        handoff = self.drain_timeout_s + self.rpc_timeout_s  # its last status call
        deregister = control_link.STOP_JOIN_S + control_link.DEREGISTER_TIMEOUT_S * sum(
            len(group) for group in self.shard_addresses)  # the links stop together
        local = local_server.STOP_JOIN_S + self.fetch_timeout_s + self.rpc_timeout_s
        return handoff + deregister + self.peer_drain_s + local

    def advertised_host(self) -> str:
        """The address peers use: configured, or the local address that routes to the controller."""
        if self.host and self.host not in ("0.0.0.0", "::"):
            return self.host
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((self.controller_host, self.controller_port))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
        finally:
            probe.close()
