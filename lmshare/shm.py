"""A named shared-memory region: a file in /dev/shm mapped into every process that uses it."""

from __future__ import annotations

import logging
import mmap
import os
import re
import tempfile
from pathlib import Path

from lmshare.errors import ConfigError
from lmshare.local_files import check_shared_file

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^lmshare-(?P<pid>\d+)-[\w.-]+$")


def shm_dir() -> Path:
    """Where regions live: $LMSHARE_SHM_DIR, else /dev/shm, else the temp dir."""
    configured = os.environ.get("LMSHARE_SHM_DIR")
    if configured:
        return Path(configured)
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


class SharedRegion:
    """A shared-memory file mapped read-write (owner, local clients) or read-only (peers)."""

    def __init__(self, path: Path, size: int, owner: bool, writable: bool) -> None:
        self.path = path
        self.size = size
        self.owner = owner
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
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise ConfigError(f"shared region {path} already exists; is another worker named "
                              f"{name!r} running in this process?") from None
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise ConfigError(f"cannot size shared region {path} to {size} bytes ({exc}); "
                              "choose a smaller --cache-size or enlarge /dev/shm") from None
        os.close(fd)
        return cls(path, size, owner=True, writable=True)

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


def remove_stale_regions() -> list[Path]:
    """Remove regions left by lmshare processes that no longer exist (e.g. after kill -9)."""
    removed = []
    directory = shm_dir()
    if not directory.is_dir():
        return removed
    for path in directory.glob("lmshare-*"):
        match = _NAME_RE.match(path.name)
        if not match:
            continue
        pid = int(match.group("pid"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass
    if removed:
        log.info("removed %d stale shared regions of dead workers", len(removed))
    return removed
