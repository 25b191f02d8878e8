"""A named shared-memory region: a file in /dev/shm mapped into every process that uses it.

The owner reserves the region's memory when it creates it (``posix_fallocate``: a /dev/shm too
small for the pool is a clear error at start, never a SIGBUS later) and holds an exclusive
``flock`` on it while it lives. A region nobody holds a lock on is stale (its owner died) and is
removed; a lock works across PID namespaces (containers sharing /dev/shm), where a pid check
would call a live owner dead. A worker also holds a lock on its name (:class:`NameLock`), so a
second worker with the same name on the host is refused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import socket
import tempfile
import time
from pathlib import Path

from lmshare.errors import ConfigError
from lmshare.local_files import check_shared_file

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^lmshare-(?P<pid>\d+)-[\w.-]+$")
_LOCK_RE = re.compile(r"^lmshare-worker-[\w.-]+\.lock$")
STALE_AGE_S = 30.0  # a file younger than this may still be being created: never stale


def shm_dir() -> Path:
    """Where regions live: $LMSHARE_SHM_DIR, else /dev/shm, else the temp dir."""
    configured = os.environ.get("LMSHARE_SHM_DIR")
    if configured:
        if not os.path.isdir(configured):
            raise ConfigError(f"LMSHARE_SHM_DIR={configured} is not a directory: create it "
                              "(a tmpfs mount for speed) or unset LMSHARE_SHM_DIR to use /dev/shm")
        return Path(configured)
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


class SharedRegion:
    """A shared-memory file mapped read-write (owner, local clients) or read-only (peers)."""

    def __init__(self, path: Path, size: int, owner: bool, writable: bool) -> None:
        self.path = path
        self.size = size
        self.owner = owner
        self._lock_fd: int | None = None
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ConfigError(f"cannot open shared region {path}: {exc.strerror} (a region is "
                              "a regular file of this user, never a link)") from None
        try:
            actual = check_shared_file(fd, path)
            if actual < size:
                raise ConfigError(f"shared region {path} is {actual} bytes, expected {size}; "
                                  "the worker that owns it may have restarted — reconnect")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.buffer = memoryview(self._mmap)

    @classmethod
    def create(cls, name: str, size: int) -> SharedRegion:
        """Create a new region of ``size`` bytes named after this process and ``name``."""
        directory = shm_dir()
        safe = re.sub(r"[^\w.-]", "_", name)
        path = directory / f"lmshare-{os.getpid()}-{safe}"
        for attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                # the same pid and name: a dead owner's file (e.g. pid 1 of a restarted
                # container) is removed; a live one's is not
                if attempt or not _remove_if_unlocked(path, min_age_s=0.0):
                    raise ConfigError(f"shared region {path} belongs to a live process (maybe "
                                      "in another container sharing this /dev/shm); give this "
                                      "worker another --name") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the region lives
            os.ftruncate(fd, size)
            reserve_shared_memory(fd, directory, size)
            region = cls(path, size, owner=True, writable=True)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        region._lock_fd = fd
        return region

    @classmethod
    def attach(cls, path: str | Path, size: int, writable: bool = True) -> SharedRegion:
        """Map an existing region (a local client, or a same-host peer read-only)."""
        try:
            return cls(Path(path), size, owner=False, writable=writable)
        except FileNotFoundError:
            raise ConfigError(f"shared region {path} does not exist; is its worker running?") from None

    def close(self) -> None:
        """Unmap; the owner also removes the file. Safe to call twice."""
        if self.buffer is None:
            return
        self.buffer.release()
        self.buffer = None
        try:
            self._mmap.close()
        except BufferError:
            log.warning("shared region %s still has exported views; leaving it mapped", self.path)
        if self.owner:
            self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def reserve_shared_memory(fd: int, directory: Path, size: int) -> None:
    """Allocate ``size`` bytes of the file behind ``fd`` now, or raise ConfigError saying how
    to make room (a tmpfs that fills up later kills the process touching the page with SIGBUS).
    """
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EOPNOTSUPP,
                             errno.EINVAL, errno.ENOSYS):
            raise ConfigError(f"cannot reserve {size} bytes of shared memory in {directory} "
                              f"({exc.strerror})") from None
        unsupported = exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
    free = 0
    try:
        info = os.statvfs(directory)
        free = info.f_bavail * info.f_frsize
    except OSError:
        pass
    if unsupported and free >= size:
        return  # no fallocate here (not tmpfs): the free space was checked instead
    from lmshare.units import format_size

    raise ConfigError(f"{directory} has {format_size(free)} free but the pool needs "
                      f"{format_size(size)}: give it more shared memory (docker run "
                      f"--shm-size={-(-size * 5 // 4 // (1 << 20))}m, or a larger tmpfs) or "
                      "choose a smaller --cache-size")


def _remove_if_unlocked(path: Path, min_age_s: float = STALE_AGE_S) -> bool:
    """Remove ``path`` if no process holds a lock on it (and it is older than ``min_age_s``);
    True if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < min_age_s:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live owner, in this PID namespace or another
        try:
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                return False  # replaced meanwhile: not the file that was checked
        except FileNotFoundError:
            return True
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove_stale_regions() -> list[Path]:
    """Remove regions and name locks of lmshare processes that are gone (e.g. after kill -9):
    files nobody holds a lock on, older than :data:`STALE_AGE_S`."""
    removed = []
    directory = shm_dir()
    if not directory.is_dir():
        return removed
    for path in directory.glob("lmshare-*"):
        if not (_NAME_RE.match(path.name) or _LOCK_RE.match(path.name)):
            continue
        if _remove_if_unlocked(path):
            removed.append(path)
    if removed:
        log.info("removed %d stale shared regions of dead workers", len(removed))
    return removed


class NameLock:
    """An exclusive lock on a worker name in one cluster (``cluster``: e.g. its controller's
    address) for as long as the worker runs, on this host: every process that shares this
    /dev/shm, whatever its PID namespace. Other clusters on the host may use the same name."""

    def __init__(self, name: str, cluster: str = "") -> None:
        safe = re.sub(r"[^\w.-]", "_", f"{cluster}-{name}" if cluster else name)
        self.path = shm_dir() / f"lmshare-worker-{safe}.lock"
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"a worker named {name!r} is already running on this host "
                                  f"for this cluster ({holder}); stop it or choose another "
                                  "--name") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by a cleanup between open and lock: take the new file
        else:
            raise ConfigError(f"cannot lock the worker name {name!r} in {self.path.parent}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the name up (removes the lock file while still holding it). Safe twice."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
