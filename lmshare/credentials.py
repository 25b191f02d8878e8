"""Cluster credentials: one secret per cluster, in a key file every member process reads.

``lmshare keygen --out FILE`` writes 32 random bytes. Everything else is derived from them
(blake2b keyed with the secret, one label per use), so one file is all an operator hands out:

- the controller's CurveZMQ server key pair and the members' CurveZMQ client key pair (the
  control plane is encrypted and only holders of the file get through the controller's ZAP
  check);
- the data-plane key of the HMAC challenge/response that opens every peer connection.

Without a key a process runs only with an explicit ``--insecure`` (see :func:`resolve_key`).

Rotation without a restart: a key file may hold, beside its ``secret`` (the key a process uses
for what it sends), the ``next`` or ``previous`` secret, which a process accepts from others
but does not use itself; processes reload the file on SIGHUP (``lmshare keygen --add-next``,
``--promote``, ``--retire`` step a file through a rotation, see docs/security.md). The
controller's CurveZMQ identity (``identity``) stays the same through rotations, so clients
never need to learn a new server key.
"""

from __future__ import annotations

import dataclasses
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
    # secrets accepted from others but not used (a rotation's next or previous key)
    accepted: tuple[bytes, ...] = field(default=(), repr=False)
    # the controller's CurveZMQ secret key ("" = derived from the secret); a rotated cluster
    # key keeps its first key's, so clients keep the server key they know
    identity: bytes = field(default=b"", repr=False)
    rotation: str = ""  # what ``accepted`` holds: "next", "previous" or "" (nothing)

    def __post_init__(self) -> None:
        for secret in (self.secret, *self.accepted):
            if len(secret) != SECRET_BYTES:
                raise ConfigError(f"a cluster key is {SECRET_BYTES} bytes, not {len(secret)}")
        if self.identity and len(self.identity) != SECRET_BYTES:
            raise ConfigError(f"a key identity is {SECRET_BYTES} bytes")

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """Every secret this key accepts: the one it uses first."""
        return (self.secret, *self.accepted)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(_derive(s, "fingerprint").hex()[:12] for s in self.secrets)

    def _with_secret(self, secret: bytes) -> ClusterKey:
        return ClusterKey(secret, self.path, self.tenant, self.server_public, (), self.identity)

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (safe to log; tells which key a process uses)."""
        return _derive(self.secret, "fingerprint").hex()[:12]

    def _curve_pair(self, label: str, raw: bytes | None = None) -> tuple[bytes, bytes]:
        import zmq
        from zmq.utils import z85

        secret = z85.encode(raw or _derive(self.secret, label))
        return zmq.curve_public(secret), secret

    def curve_server(self) -> tuple[bytes, bytes]:
        """The controller's CurveZMQ (public, secret) pair (the cluster key only)."""
        if self.tenant:
            raise ConfigError("a controller needs the cluster key, not a tenant's credential")
        return self._curve_pair("curve-server", self.identity or None)



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
                          server_public=self.curve_server()[0],
                          accepted=tuple(_derive(s, f"tenant:{tenant}") for s in self.accepted),
                          rotation=self.rotation)

    def curve_client_public(self) -> bytes:
        return self._curve_pair("curve-client")[0]

    def curve_client_publics(self) -> list[bytes]:
        """The client public keys of every secret this key accepts (the controller's ZAP)."""
        return [self._with_secret(s).curve_client_public() for s in self.secrets]

    def data_keys(self) -> list[bytes]:
        """The data-plane keys of every secret this key accepts, the one it uses first."""
        return [_derive(s, "data-plane") for s in self.secrets]

    def local_keys(self) -> list[bytes]:
        return [_derive(s, "local-endpoint") for s in self.secrets]

    def same_cluster(self, other: ClusterKey) -> bool:
        """Whether ``other`` (a reloaded file) may replace this key in a running process: the
        same tenant and controller identity, and a secret in common (a rotation step)."""
        return (other.tenant == self.tenant and other.server_public == self.server_public
                and (self.tenant or self.curve_server()[0] == other.curve_server()[0])
                and bool(set(self.secrets) & set(other.secrets)))

    def local_key(self) -> bytes:
        """The key a worker proves itself with to its local clients (lmshare.Client)."""
        return _derive(self.secret, "local-endpoint")

    def data_key(self) -> bytes:
        """The key of the data-plane handshake (lmshare/handshake.py)."""
        return _derive(self.secret, "data-plane")


def _body(key: ClusterKey) -> str:
    """A key file's text: the secret it uses, the others it accepts, its identity."""
    data: dict = {"kind": TENANT_KIND if key.tenant else KEY_KIND, "version": KEY_VERSION}
    if key.tenant:
        data["tenant"] = key.tenant
        data["server_public"] = key.server_public.decode()
    data["secret"] = key.secret.hex()
    if key.accepted:
        data[key.rotation or "previous"] = key.accepted[0].hex()
    if key.identity and not key.tenant:
        data["identity"] = key.identity.hex()
    return json.dumps(data) + "\n"


def _write_new(path: Path, body: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; keygen never overwrites a key (remove it first, or "
                          "choose another --out)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(body)


def _replace(path: Path, body: str) -> None:
    """Write ``body`` over ``path`` at once (a reader sees the old file or the new one)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_new(temporary, body)
    try:
        os.replace(temporary, path)
    except OSError as exc:
        os.unlink(temporary)
        raise ConfigError(f"cannot replace key file {path}: {exc.strerror}") from None


def generate_key_file(path: str | Path) -> ClusterKey:
    """Write a new cluster key to ``path`` (created 0600; an existing file is never replaced)."""
    key = ClusterKey(secrets.token_bytes(SECRET_BYTES), str(path))
    _write_new(Path(path), _body(key))
    return key


def generate_tenant_file(cluster: ClusterKey, tenant: str, path: str | Path,
                         replace: bool = False) -> ClusterKey:
    """Write ``tenant``'s credential (derived from the cluster key, with the same rotation
    step) to ``path`` (0600; an existing file only with ``replace``, at once)."""
    key = dataclasses.replace(cluster.for_tenant(tenant), path=str(path))
    (_replace if replace else _write_new)(Path(path), _body(key))
    return key


def rotate_key_file(path: str | Path, step: str) -> ClusterKey:
    """One step of a rotation, written over the cluster key file ``path`` at once:
    ``add-next`` (a new secret, accepted but not used yet), ``promote`` (use the next secret;
    the old one stays accepted as previous), ``retire`` (stop accepting the previous one)."""
    key = load_key_file(path)
    if key.tenant:
        raise ConfigError(f"{path} is tenant {key.tenant}'s credential: rotate the cluster key, "
                          "then remake the tenants' files (keygen --tenant ... --replace)")
    identity = key.identity or _derive(key.secret, "curve-server")  # the controller's, kept
    if step == "add-next":
        if key.rotation == "next":
            raise ConfigError(f"{path} already has a next key: --promote it first")
        new = ClusterKey(key.secret, key.path, accepted=(secrets.token_bytes(SECRET_BYTES),),
                         identity=identity, rotation="next")
    elif step == "promote":
        if key.rotation != "next":
            raise ConfigError(f"{path} has no next key to promote: --add-next first")
        new = ClusterKey(key.accepted[0], key.path, accepted=(key.secret,), identity=identity,
                         rotation="previous")
    elif step == "retire":
        if key.rotation != "previous":
            raise ConfigError(f"{path} has no previous key to retire (--add-next, then "
                              "--promote, come first)")
        new = ClusterKey(key.secret, key.path, identity=identity)
    else:
        raise ConfigError(f"unknown rotation step {step!r}: add-next, promote or retire")
    _replace(Path(path), _body(new))
    return new


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
        if "next" in data and "previous" in data:
            raise ValueError("a key file holds a next or a previous key, not both")
        rotation = "next" if "next" in data else "previous" if "previous" in data else ""
        accepted = (bytes.fromhex(data[rotation]),) if rotation else ()
        identity = bytes.fromhex(data["identity"]) if "identity" in data and not tenant else b""
        return ClusterKey(secret, str(path), tenant, server_public, accepted, identity, rotation)
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise ConfigError(f"key file {path} is not an lmshare cluster key ({exc}); make one "
                          "with `lmshare keygen --out FILE`") from None


def reload_key(current: ClusterKey) -> ClusterKey:
    """The key file ``current`` came from, read again (on SIGHUP): the new key if it is a step
    of a rotation of ``current`` (same cluster, tenant and controller identity, a secret in
    common), else ConfigError (the running key stays)."""
    if not current.path:
        raise ConfigError("this process's key did not come from a file: nothing to reload")
    new = load_key_file(current.path)
    if not current.same_cluster(new):
        raise ConfigError(f"{current.path} now holds a key that shares no secret with the one "
                          "in use (or another tenant's, or another controller identity); kept "
                          "the running key. Rotate with `lmshare keygen --rotate STEP`")
    return new


def reload_on_sighup(current: ClusterKey | None, process: str) -> ClusterKey | None:
    """What a ``process`` ("worker", "controller") that got SIGHUP uses from now on: its key
    file read again, or None (logged: no key to reload, or the file is not a rotation of the
    running key, which then stays)."""
    if current is None:
        log.warning("SIGHUP: this %s runs without a key (--insecure); nothing to reload", process)
        return None
    try:
        key = reload_key(current)
    except ConfigError as exc:
        log.error("key not reloaded: %s", exc)
        return None
    log.warning("key reloaded from %s: using %s", key.path, describe(key))
    return key


def describe(key: ClusterKey) -> str:
    """What a process logs of its key: fingerprints, never secrets."""
    text = f"key {key.fingerprint}" + (f" (tenant {key.tenant})" if key.tenant else "")
    if key.accepted:
        text += f", also accepting {key.rotation} key {key.fingerprints[1]}"
    return text


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
