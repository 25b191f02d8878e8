"""Local hardening: the runtime directory (local sockets) and shared-memory files are private.

Another local user must not be able to pre-create a directory that a worker then uses (and swap
its socket), nor hand a worker or client a file to map. So the runtime directory is created 0700
and, when it exists, used only if it is a real directory of this user that nobody else can
enter; shared-memory regions are regular files of this user, mode 0600, opened without
following links.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lmshare.errors import ConfigError


def ensure_private_dir(path: str | Path, what: str = "runtime directory") -> Path:
    """Create ``path`` 0700 if missing; refuse it unless it is this user's and private."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {path}: {exc.strerror}") from None
    check_private_dir(path, what)
    return path


def check_private_dir(path: str | Path, what: str = "runtime directory") -> None:
    """Raise ConfigError unless ``path`` is a directory (not a link) of this user, closed to
    group and others."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"the {what} {path} does not exist; is the worker running?") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the {what} {path} is not a directory (a link or a file); another "
                          "user may have planted it: remove it, or set LMSHARE_RUNTIME_DIR to "
                          "a private directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"the {what} {path} belongs to uid {info.st_uid}, not to this user "
                          f"({os.getuid()}): another user may have planted it to swap sockets; "
                          "remove it, or set LMSHARE_RUNTIME_DIR to a private directory")
    if info.st_mode & 0o077:
        raise ConfigError(f"the {what} {path} has mode {stat.S_IMODE(info.st_mode):o}: others "
                          f"can enter it (and swap sockets); run `chmod 700 {path}`, or set "
                          "LMSHARE_RUNTIME_DIR to a private directory")


def check_shared_file(fd: int, path: str | Path) -> int:
    """Check an open shared-memory file: a regular file of this user, mode 0600 (nobody else
    wrote or can write it). Returns its size."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"shared region {path} is not a regular file; refusing to map it")
    if info.st_uid != os.getuid():
        raise ConfigError(f"shared region {path} belongs to uid {info.st_uid}, not to this user "
                          f"({os.getuid()}); refusing to map it (run the worker and its "
                          "clients as one user)")
    if info.st_mode & 0o077:
        raise ConfigError(f"shared region {path} has mode {stat.S_IMODE(info.st_mode):o}; "
                          "lmshare's regions are 0600: refusing to map it")
    return info.st_size
