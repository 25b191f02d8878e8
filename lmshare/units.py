"""Parsing of human-friendly sizes, durations and addresses."""

from __future__ import annotations

import re

from lmshare.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "B": 1,
    "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024,
    "M": 1000**2, "MB": 1000**2, "MIB": 1024**2, "MI": 1024**2,
    "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "GI": 1024**3,
    "T": 1000**4, "TB": 1000**4, "TIB": 1024**4, "TI": 1024**4,
}


def parse_size(text: str | int) -> int:
    """Parse ``"8GiB"``, ``"512MB"``, ``"4096"`` into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size {text} is negative; give a positive size such as 8GiB")
        return text
    match = _SIZE_RE.match(text)
    unit = (match.group(2) or "").upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"cannot read size {text!r}; write a number with an optional unit, "
            "for example 8GiB, 512MiB or 1000000"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """Format bytes with a binary unit, e.g. ``1.5 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or a bare ``PORT``) into a (host, port) pair."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"cannot read address {text!r}; write HOST:PORT, for example 127.0.0.1:7800")
    return host, port
