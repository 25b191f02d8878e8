"""CurveZMQ on the control plane: the server side's key check, refusal log and counters.

A ROUTER socket made a CURVE server by :func:`secure_server` only completes handshakes with
clients that know the server's key; :class:`CurveGuard` answers the ZAP requests of every socket it
secured (only the cluster's client key passes) and watches each socket's handshake failures (no
CURVE at all, garbage, a wrong server key). Each refused peer address is logged once, and every
refusal is counted by reason in :attr:`CurveGuard.refused` and by socket (:meth:`by_socket`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from lmshare.credentials import ClusterKey, CurveKeys

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "lmshare"
MAX_LOGGED_ADDRESSES = 1024

REASON_WRONG_KEY = "wrong_key"  # spoke CURVE, but not with the cluster's client key
REASON_RETIRED = "retired_key"  # a connection opened with a key retired since (rotation)
REASON_NO_CURVE = "handshake"  # no CURVE (no key / --insecure), a wrong server key, garbage
# (libzmq's protocol failures; a connection closed mid-handshake is none of these)


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of the cluster's controller."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


class CurveGuard:
    """ZAP handler (one per zmq context) and handshake watcher of the CURVE server sockets it
    secured (:meth:`secure_server`, each under its own name)."""

    def __init__(self, context: zmq.Context, key: ClusterKey, what: str,
                 tenants: tuple[str, ...] | list[str] = ()) -> None:
        self.what = what
        self.refused: Counter[str] = Counter()
        self._refused_by: dict[str, Counter[str]] = {}  # socket name -> reason -> count
        self._tenants = tuple(tenants)
        self._allowed: dict[bytes, str] = {}
        self.set_key(key)
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = context
        self._zap = context.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        # socket name -> its monitor (handed to the thread on its next turn)
        self._monitors: dict[str, zmq.Socket] = {}
        self._watching: list[_Watch] = []  # the thread's own: one per monitor it polls
        self._thread = threading.Thread(target=self._loop, name=f"lmshare-{what}-auth",
                                        daemon=True)

    def set_key(self, key: ClusterKey) -> None:
        """Admit the client keys of every secret ``key`` accepts (during a rotation, the key in
        use and the next or previous one), and of its tenants; messages on connections that
        a key no longer admitted opened are refused from now on (:meth:`member`)."""
        allowed = {public: "" for public in key.curve_client_publics()}
        for tenant in self._tenants:
            for public in key.for_tenant(tenant).curve_client_publics():
                allowed[public] = tenant
        self._allowed = allowed

    def member(self, user_id: str | None) -> str | None:
        """The tenant a message is served as, from the user id its connection's ZAP check
        gave; None when the key that opened the connection is no longer admitted."""
        tenant, _, public = (user_id or "").partition("/")  # (tenant names have no "/")
        found = self._allowed.get(public.encode())
        return found if found == tenant else None

    def refuse_retired(self) -> None:
        """Count (and log once) a message on a connection whose key was retired."""
        self._refuse(REASON_RETIRED, "a connection opened before the key rotation")

    def secure_server(self, sock: zmq.Socket, key: ClusterKey, name: str = "control") -> None:
        """Make ``sock`` (before bind) a CURVE server checked by this guard; start watching it.
        ``name`` tells its refusals apart from other sockets' (:meth:`by_socket`)."""
        public, secret = key.curve_server()
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.zap_domain = _domain(name)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        with self._lock:
            self._monitors[name] = monitor
            self._refused_by.setdefault(name, Counter())
        if not self._thread.is_alive():
            self._thread.start()

    def total(self) -> int:
        with self._lock:
            return sum(self.refused.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.refused)

    def by_socket(self) -> dict[str, dict[str, int]]:
        """Refusals by socket name, then reason (connections on a retired key: counted in
        :meth:`counts` only, as the controller's loop finds them)."""
        with self._lock:
            return {name: dict(counts) for name, counts in self._refused_by.items()}

    def _refuse(self, reason: str, address: str, name: str = "") -> None:
        host = address.rsplit(":", 1)[0]  # a client retrying comes from ever new ports
        with self._lock:
            self.refused[reason] += 1
            if name in self._refused_by:
                self._refused_by[name][reason] += 1
            first = (reason, host) not in self._logged and len(self._logged) < MAX_LOGGED_ADDRESSES
            if first:
                self._logged.add((reason, host))
        if first:
            log.warning("%s refused a connection from %s (%s): %s; logged once per address",
                        self.what, address, reason,
                        "it does not hold this cluster's key" if reason == REASON_WRONG_KEY
                        else "its key was retired by a key rotation; it must reconnect with "
                             "the cluster's current key" if reason == REASON_RETIRED
                        else "no CURVE handshake with this cluster's key (a process without "
                             "--key-file, another cluster's key, or not lmshare)")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._watch_new(poller)
                ready = dict(poller.poll(200))
                if self._zap in ready:
                    self._answer_zap(self._zap.recv_multipart())
                for watch in self._watching:
                    if watch.monitor in ready:
                        self._on_event(watch, parse_monitor_message(watch.monitor.recv_multipart()))
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                log.error("%s: authentication thread stopped: %s", self.what, exc)
        finally:
            self._zap.close(linger=0)
            for watch in self._watching:
                watch.monitor.close(linger=0)

    def _watch_new(self, poller: zmq.Poller) -> None:
        """Poll the monitors of sockets secured since the last turn."""
        with self._lock:
            fresh, self._monitors = self._monitors, {}
        for name, monitor in fresh.items():
            self._watching.append(_Watch(name, monitor))
            poller.register(monitor, zmq.POLLIN)

    def _answer_zap(self, frames: list[bytes]) -> None:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        public = _z85(frames[6]) if mechanism == b"CURVE" and len(frames) >= 7 else b""
        tenant = self._allowed.get(public) if public else None
        if tenant is None:
            self._refuse(REASON_WRONG_KEY, address.decode(errors="replace"),
                         _name_of(domain))
        status, text = (b"200", b"OK") if tenant is not None else \
            (b"400", b"not a member of this cluster")
        # the user id travels with each message: the tenant the controller serves it as, and
        # the client key it proved (checked again on each message: see member)
        user_id = f"{tenant}/{public.decode()}".encode() if tenant is not None else b""
        self._zap.send_multipart([version, request_id, status, text, user_id, b""])

    def _on_event(self, watch: _Watch, event: dict) -> None:
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_ACCEPTED:
            watch.accepted[value] = _peer_address(value)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            watch.pending_failure = REASON_NO_CURVE  # the engine's next event: its disconnect
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # the other end closed before the handshake finished: a client that gave up waiting
            # on a busy server, or a port probe; nothing was refused (not counted)
            log.debug("%s: a connection closed during its handshake", self.what)
        elif kind == zmq.EVENT_DISCONNECTED:
            address = watch.accepted.pop(value, "an unknown address")
            if watch.pending_failure is not None:
                self._refuse(watch.pending_failure, address, watch.name)
                watch.pending_failure = None
        if len(watch.accepted) > 65536:  # fds of connections whose disconnect we missed
            watch.accepted.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        else:
            self._zap.close(linger=0)
            for monitor in self._monitors.values():
                monitor.close(linger=0)


@dataclass
class _Watch:
    """One secured socket's monitor, as the guard's thread follows it."""

    name: str
    monitor: zmq.Socket
    accepted: dict[int, str] = field(default_factory=dict)  # fd -> peer address
    pending_failure: str | None = None  # a handshake failure awaiting its disconnect


def _domain(name: str) -> bytes:
    """The ZAP domain of socket ``name`` (the main socket keeps the historical one)."""
    return (ZAP_DOMAIN if name == "control" else f"{ZAP_DOMAIN}.{name}").encode()


def _name_of(domain: bytes) -> str:
    text = domain.decode(errors="replace")
    return text[len(ZAP_DOMAIN) + 1:] if text.startswith(f"{ZAP_DOMAIN}.") else "control"


def _z85(public: bytes) -> bytes:
    from zmq.utils import z85

    return z85.encode(public) if len(public) == 32 else public


def _peer_address(fd: int) -> str:
    """The remote address of an accepted connection's descriptor (best effort: it may already
    be closed when the monitor event is read)."""
    try:
        with socket.socket(fileno=_dup(fd)) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except (OSError, ValueError):
        return "an unknown address"


def _dup(fd: int) -> int:
    import os

    return os.dup(fd)
