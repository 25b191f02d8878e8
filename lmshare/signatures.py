"""Signatures on the wire, and what makes two of them differ.

A worker reports the :class:`~lmshare.keys.ModelSignature` behind each namespace its clients
use; when nobody else uses a worker's namespace but another worker serves the same model, the
controller names the fields that differ ("kv_dtype bfloat16 vs float16", "tokenizer_hash
differs from node-b's"), so a silent miss caused by one config field becomes a sentence.

Signatures come from peers: :func:`from_wire` checks every field's type and recomputes the
namespace, and everything printed goes through :func:`~lmshare.stats.printable`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmshare.errors import ConfigError
from lmshare.keys import ModelSignature
from lmshare.schema import Map, Scalar, Str
from lmshare.stats import printable

MAX_FIELD_CHARS = 2048  # a signature field's value on the wire
MAX_VALUE_SHOWN = 40  # characters of a differing value shown in a diagnosis
MAX_DIAGNOSIS_CHARS = 600
#: the wire form of one signature: field name → value (checked by the protocol's schemas)
WIRE = Map(Str(32), Scalar(MAX_FIELD_CHARS), 16)
# fields whose values are hashes, paths or secrets: a diagnosis says only that they differ
OPAQUE = ("revision", "tokenizer_hash", "rope_scaling", "lora_adapter", "tenant")
_TYPES = {f.name: f.type for f in dataclasses.fields(ModelSignature)}


def to_wire(signature: ModelSignature) -> dict[str, Any] | None:
    """``signature`` as a worker accepts it (None when a field is too long to report: the
    lookup then goes without it)."""
    data = signature.to_dict()
    if any(isinstance(v, str) and len(v) > MAX_FIELD_CHARS for v in data.values()):
        return None
    return data


def from_wire(data: Any, namespace: bytes) -> ModelSignature | None:
    """The signature a peer reported for ``namespace``, or None when it is malformed or does
    not hash to that namespace."""
    if not isinstance(data, dict) or set(data) != set(_TYPES):
        return None
    for name, value in data.items():
        wanted = int if _TYPES[name] in ("int", int) else str
        if type(value) is not wanted:
            return None
    try:
        signature = ModelSignature(**data)
    except (ConfigError, TypeError):
        return None
    return signature if signature.namespace() == namespace else None


@dataclass(frozen=True)
class FieldDifference:
    field: str
    mine: str  # "" for an opaque field
    theirs: str

    def describe(self, peer: str) -> str:
        if self.field in OPAQUE:
            return f"{self.field} differs from {peer}'s"
        return f"{self.field} {self.mine} vs {self.theirs}"


def _shown(value: Any) -> str:
    return printable(value, MAX_VALUE_SHOWN) or "''"


def _layout_parts(layout: str) -> dict[str, str]:
    parts = {}
    for item in layout.split(","):
        name, sep, value = item.partition("=")
        if sep:
            parts[name] = value
    return parts


def differences(mine: ModelSignature, theirs: ModelSignature) -> list[FieldDifference]:
    """The fields in which two signatures differ, ``kv_layout`` split into its parts."""
    out: list[FieldDifference] = []
    for name in _TYPES:
        a, b = getattr(mine, name), getattr(theirs, name)
        if a == b:
            continue
        if name in OPAQUE:
            out.append(FieldDifference(name, "", ""))
        elif name == "kv_layout":
            pa, pb = _layout_parts(a), _layout_parts(b)
            parts = [p for p in dict.fromkeys([*pa, *pb]) if pa.get(p) != pb.get(p)]
            if not parts:
                out.append(FieldDifference(name, _shown(a), _shown(b)))
            for part in parts:
                out.append(FieldDifference(f"kv_layout.{printable(part, 20)}",
                                           _shown(pa.get(part, "-")), _shown(pb.get(part, "-"))))
        else:
            out.append(FieldDifference(name, _shown(a), _shown(b)))
    return out


def describe(differences_: list[FieldDifference], peer: str) -> str:
    """What differs from ``peer``'s signature, one clause per field."""
    peer = printable(peer, 60)
    return "; ".join(d.describe(peer) for d in differences_)[:MAX_DIAGNOSIS_CHARS]


def sentence(differences_: list[FieldDifference], peer: str, model: str) -> str:
    """The diagnosis as a connector logs it."""
    text = (f"{printable(peer, 60)} serves {printable(model, 80)} with another signature: "
            f"{describe(differences_, peer)}")
    return text[:MAX_DIAGNOSIS_CHARS]
