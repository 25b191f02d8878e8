"""Field specs for protocol messages: every value from the network is typed and bounded.

A spec checks one decoded msgpack value and returns it (a number spec may widen an ``int`` to a
``float``, a list spec turns a tuple into a list). Anything else — a wrong type, an integer out
of range, a NaN, a string, byte string, list or map over its cap — raises
:class:`~lmshare.errors.ProtocolError` with code ``bad_message`` that names the field, never
the value (so an error reply stays small whatever was sent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmshare.errors import ErrorCode, ProtocolError

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)


def _refuse(where: str, problem: str) -> ProtocolError:
    return ProtocolError(f"field {where} {problem}")


def _mistyped(where: str, value: Any) -> ProtocolError:
    return _refuse(where, f"has type {type(value).__name__}")


class Spec:
    """One field's type and bounds."""

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def example(self) -> Any:
        """A smallest valid value (for tests and fuzzers)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int = I64_MAX

    def check(self, value: Any, where: str) -> int:
        if type(value) is not int:
            raise _mistyped(where, value)
        if not self.lo <= value <= self.hi:
            raise _refuse(where, f"is outside [{self.lo}, {self.hi}]")
        return value

    def example(self) -> int:
        return self.lo


@dataclass(frozen=True)
class Float(Spec):
    """A finite number in [lo, hi]; integers are accepted and returned as floats."""

    lo: float = 0.0
    hi: float = 1e9

    def check(self, value: Any, where: str) -> float:
        if type(value) not in (int, float):
            raise _mistyped(where, value)
        if type(value) is int and not I64_MIN <= value <= I64_MAX:
            raise _refuse(where, f"is outside [{self.lo}, {self.hi}]")
        number = float(value)
        if not math.isfinite(number):
            raise _refuse(where, "must be a finite number")
        if not self.lo <= number <= self.hi:
            raise _refuse(where, f"is outside [{self.lo}, {self.hi}]")
        return number

    def example(self) -> float:
        return float(self.lo)


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _mistyped(where, value)
        return value

    def example(self) -> bool:
        return False


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = 200
    min_len: int = 0

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise _mistyped(where, value)
        if not self.min_len <= len(value) <= self.max_len:
            raise _refuse(where, f"must be {self.min_len}-{self.max_len} characters")
        return value

    def example(self) -> str:
        return "x" * self.min_len


@dataclass(frozen=True)
class Bytes(Spec):
    max_len: int = 1 << 20
    exact: int | None = None  # e.g. 16 for chunk keys and namespaces

    def check(self, value: Any, where: str) -> bytes:
        if type(value) is not bytes:
            raise _mistyped(where, value)
        if self.exact is not None and len(value) != self.exact:
            raise _refuse(where, f"must be {self.exact} bytes")
        if len(value) > self.max_len:
            raise _refuse(where, f"is longer than {self.max_len} bytes")
        return value

    def fits(self, value: Any) -> bool:
        """What :meth:`check` accepts, without building an error (the many-keys path)."""
        return type(value) is bytes and len(value) <= self.max_len and \
            (self.exact is None or len(value) == self.exact)

    def example(self) -> bytes:
        return bytes(self.exact or 0)


@dataclass(frozen=True)
class Scalar(Spec):
    """None, a bool, a finite number, or a capped string or byte string (free-form maps)."""

    max_len: int = 4096

    def check(self, value: Any, where: str) -> Any:
        if value is None or type(value) is bool:
            return value
        if type(value) is int:
            return Int(I64_MIN, 2**64 - 1).check(value, where)
        if type(value) is float:
            if not math.isfinite(value):
                raise _refuse(where, "must be a finite number")
            return value
        if type(value) in (str, bytes):
            if len(value) > self.max_len:
                raise _refuse(where, f"is longer than {self.max_len}")
            return value
        raise _mistyped(where, value)

    def example(self) -> Any:
        return None


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int = 1024

    def check(self, value: Any, where: str) -> list:
        if type(value) not in (list, tuple):
            raise _mistyped(where, value)
        if len(value) > self.max_len:
            raise ProtocolError(f"field {where} has {len(value)} items, more than "
                                f"{self.max_len}; split the request", code=ErrorCode.TOO_LARGE)
        item = self.item
        if type(item) is Bytes and item.exact is not None:  # chunk keys: the hot path
            size = item.exact
            if all(type(v) is bytes and len(v) == size for v in value):
                return list(value)
        return [item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def example(self) -> list:
        return []


@dataclass(frozen=True)
class Map(Spec):
    key: Spec
    value: Spec
    max_len: int = 64

    def check(self, value: Any, where: str) -> dict:
        if type(value) is not dict:
            raise _mistyped(where, value)
        if len(value) > self.max_len:
            raise ProtocolError(f"field {where} has {len(value)} entries, more than "
                                f"{self.max_len}", code=ErrorCode.TOO_LARGE)
        key, item = self.key, self.value
        if type(key) is Bytes and type(item) is Bytes:  # key → digest maps: the hot path
            if all(key.fits(k) and item.fits(v) for k, v in value.items()):
                return dict(value)
        return {key.check(k, f"{where} key"): item.check(v, f"{where}[{k!r:.40}]")
                for k, v in value.items()}

    def example(self) -> dict:
        return {}


@dataclass(frozen=True)
class KeyMap(Spec):
    """namespace → list of chunk keys, at most ``max_keys`` keys in all."""

    key_bytes: int = 16
    max_keys: int = 65536
    max_namespaces: int = 1024

    def check(self, value: Any, where: str) -> dict:
        keys = List(Bytes(exact=self.key_bytes), self.max_keys)
        checked = Map(Bytes(exact=self.key_bytes), keys, self.max_namespaces).check(value, where)
        total = sum(len(v) for v in checked.values())
        if total > self.max_keys:
            raise ProtocolError(f"field {where} holds {total} keys, more than "
                                f"{self.max_keys}; split it", code=ErrorCode.TOO_LARGE)
        return checked

    def example(self) -> dict:
        return {}


@dataclass(frozen=True)
class Optional(Spec):
    """A field that may be absent (checked by ``inner`` when present)."""

    inner: Spec

    def check(self, value: Any, where: str) -> Any:
        return self.inner.check(value, where)

    def example(self) -> Any:
        return self.inner.example()
