"""Cluster credentials: one secret per cluster, in a key file every member process reads.

``lmshare keygen --out FILE`` writes 32 random bytes. Everything else is derived from them
(blake2b keyed with the secret, one label per use), so one file is all an operator hands out:

- the controller's CurveZMQ server key pair and the members' CurveZMQ client key pair (the
  control plane is encrypted and only holders of the file get through the controller's ZAP
  check);
- the data-plane key of the HMAC challenge/response that opens every peer connection.

Without a key a process runs only with an explicit ``--insecure`` (see :func:`resolve_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lmshare.errors import ConfigError

log = logging.getLogger(__name__)

KEY_ENV = "LMSHARE_KEY_FILE"
KEY_KIND = "lmshare-cluster-key"
TENANT_KIND = "lmshare-tenant-key"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_VERSION = 1
SECRET_BYTES = 32


def _derive(secret: bytes, label: str) -> bytes:
    return hashlib.blake2b(label.encode(), key=secret, digest_size=32).digest()


@dataclass(frozen=True)
class CurveKeys:
    """What a CurveZMQ client needs (z85-encoded): the server's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class ClusterKey:
    """The cluster secret and the keys derived from it; or, with ``tenant``, one tenant's
    credential: its own secret (derived from the cluster's) and the controller's public key.
    A tenant's processes reach the controller as that tenant and only the data ports of the
    same tenant's workers; the cluster key itself is every tenant's and the operator's."""

    secret: bytes = field(repr=False)
    path: str = ""
    tenant: str = ""  # "" = the cluster key
    server_public: bytes = b""  # the controller's CurveZMQ public key (tenant credentials)

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_BYTES:
            raise ConfigError(f"a cluster key is {SECRET_BYTES} bytes, not {len(self.secret)}")

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (safe to log; tells which key a process uses)."""
        return _derive(self.secret, "fingerprint").hex()[:12]

    def _curve_pair(self, label: str) -> tuple[bytes, bytes]:
        import zmq
        from zmq.utils import z85

        secret = z85.encode(_derive(self.secret, label))
        return zmq.curve_public(secret), secret

    def curve_server(self) -> tuple[bytes, bytes]:
        """The controller's CurveZMQ (public, secret) pair (the cluster key only)."""
        if self.tenant:
            raise ConfigError("a controller needs the cluster key, not a tenant's credential")
        return self._curve_pair("curve-server")

    def curve_client(self) -> CurveKeys:
        """What every member uses to connect to the controller."""
        public, secret = self._curve_pair("curve-client")
        return CurveKeys(self.server_public or self.curve_server()[0], public, secret)

    def for_tenant(self, tenant: str) -> ClusterKey:
        """The credential of ``tenant``, derived from the cluster key."""
        if self.tenant:
            raise ConfigError("tenant credentials are made from the cluster key")
        if not TENANT_NAME.match(tenant):
            raise ConfigError(f"tenant name {tenant!r}: use 1-64 letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit")
        return ClusterKey(_derive(self.secret, f"tenant:{tenant}"), tenant=tenant,
                          server_public=self.curve_server()[0])

    def curve_client_public(self) -> bytes:
        return self._curve_pair("curve-client")[0]

    def local_key(self) -> bytes:
        """The key a worker proves itself with to its local clients (lmshare.Client)."""
        return _derive(self.secret, "local-endpoint")

    def data_key(self) -> bytes:
        """The key of the data-plane handshake (lmshare/handshake.py)."""
        return _derive(self.secret, "data-plane")


def generate_key_file(path: str | Path) -> ClusterKey:
    """Write a new cluster key to ``path`` (created 0600; an existing file is never replaced)."""
    path = Path(path)
    secret = secrets.token_bytes(SECRET_BYTES)
    body = json.dumps({"kind": KEY_KIND, "version": KEY_VERSION, "secret": secret.hex()}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; keygen never overwrites a key (remove it first, or "
                          "choose another --out)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return ClusterKey(secret, str(path))


def generate_tenant_file(cluster: ClusterKey, tenant: str, path: str | Path) -> ClusterKey:
    """Write ``tenant``'s credential (derived from the cluster key) to ``path`` (0600, never
    overwritten)."""
    key = cluster.for_tenant(tenant)
    path = Path(path)
    body = json.dumps({"kind": TENANT_KIND, "version": KEY_VERSION, "tenant": tenant,
                       "secret": key.secret.hex(),
                       "server_public": key.server_public.decode()}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; keygen never overwrites a key (remove it first, or "
                          "choose another --out)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return ClusterKey(key.secret, str(path), tenant, key.server_public)


def load_key_file(path: str | Path) -> ClusterKey:
    """Read a key file; refuses one that others than its owner can read or write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist; make one with "
                          f"`lmshare keygen --out {path}`") from None
    except OSError as exc:
        raise ConfigError(f"cannot open key file {path}: {exc.strerror} (it must be a regular "
                          "file, not a link, readable by this user)") from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"key file {path} is accessible to other users (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`")
        if info.st_uid != os.getuid():
            raise ConfigError(f"key file {path} belongs to uid {info.st_uid}, not to this user "
                              f"({os.getuid()}); copy it and own the copy")
        text = f.read(4096)
    try:
        data = json.loads(text)
        if data.get("kind") not in (KEY_KIND, TENANT_KIND) or data.get("version") != KEY_VERSION:
            raise ValueError("not an lmshare cluster key")
        secret = bytes.fromhex(data["secret"])
        tenant = str(data.get("tenant", "")) if data["kind"] == TENANT_KIND else ""
        server_public = str(data.get("server_public", "")).encode() if tenant else b""
        if data["kind"] == TENANT_KIND and (not TENANT_NAME.match(tenant)
                                             or len(server_public) != 40):
            raise ValueError("a tenant credential needs a tenant name and the controller's key")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"key file {path} is not an lmshare cluster key ({exc}); make one "
                          "with `lmshare keygen --out FILE`") from None
    return ClusterKey(secret, str(path), tenant, server_public)


def resolve_key(key_file: str | None, insecure: bool) -> ClusterKey | None:
    """The key a process runs with: ``--key-file``, else ``$LMSHARE_KEY_FILE``; None only with
    ``insecure``. Raises ConfigError when there is no key and no explicit ``--insecure``."""
    key_file = key_file or os.environ.get(KEY_ENV) or None
    if key_file:
        key = load_key_file(key_file)
        if insecure:
            log.warning("--insecure ignored: a cluster key was given (%s)", key_file)
        return key
    if not insecure:
        raise ConfigError("no cluster key: make one with `lmshare keygen --out FILE` and pass "
                          f"--key-file FILE (or set {KEY_ENV}) on every process; --insecure runs "
                          "without authentication (anyone who reaches the ports joins the "
                          "cluster)")
    log.warning("running without a cluster key (--insecure): anyone who reaches this process's "
                "ports can read, poison or empty the cache")
    return None
