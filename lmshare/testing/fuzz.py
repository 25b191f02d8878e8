"""Hypothesis strategies for fuzzing every decoder of network input: raw bytes, any msgpack
value, and messages of each protocol type whose fields are near-valid or hostile (drawn from
the field specs in :data:`lmshare.protocol.SCHEMAS`).

``LMSHARE_FUZZ_EXAMPLES`` sets the examples per test (default 1000; two or three tests cover
each decoder; docs/reliability.md has a run of 100000)."""

from __future__ import annotations

import os
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lmshare import protocol
from lmshare.schema import (
    Bool,
    Bytes,
    Float,
    Int,
    KeyMap,
    List,
    Map,
    Optional,
    Scalar,
    Spec,
    Str,
)

EXAMPLES = int(os.environ.get("LMSHARE_FUZZ_EXAMPLES", "1000"))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# any msgpack value, with the numbers and sizes that break naive code
edge_ints = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63),
                             2**64 - 1, 65535, 65536])
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | edge_ints
           | st.floats(allow_nan=True, allow_infinity=True) | st.binary(max_size=40)
           | st.text(max_size=40))
values = st.recursive(scalars, lambda children: st.lists(children, max_size=6)
                      | st.dictionaries(st.text(max_size=8) | st.binary(max_size=16), children,
                                        max_size=6), max_leaves=30)


def near(spec: Spec) -> st.SearchStrategy[Any]:
    """Values around what ``spec`` accepts: valid ones, its edges and just past them."""
    if isinstance(spec, Optional):
        return near(spec.inner)
    if isinstance(spec, Int):
        return (st.integers(spec.lo, min(spec.hi, spec.lo + 2**70))
                | st.sampled_from([spec.lo, spec.hi, spec.lo - 1, spec.hi + 1]).filter(
                    lambda v: -(2**63) <= v <= 2**64 - 1)
                | st.booleans() | st.floats())
    if isinstance(spec, Float):
        return (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**63)
                | st.sampled_from([spec.lo, spec.hi, spec.hi * 2, -1.0]))
    if isinstance(spec, Bool):
        return st.booleans() | st.integers(0, 1)
    if isinstance(spec, Str):
        return st.text(max_size=min(spec.max_len + 2, 300)) | st.binary(max_size=20)
    if isinstance(spec, Bytes):
        if spec.exact is not None:
            return st.binary(min_size=spec.exact, max_size=spec.exact) | st.binary(max_size=40)
        return st.binary(max_size=min(spec.max_len + 2, 300))
    if isinstance(spec, List):
        return st.lists(near(spec.item), max_size=24) | st.lists(values, max_size=4)
    if isinstance(spec, Map):
        return st.dictionaries(near(spec.key), near(spec.value), max_size=8) | values
    if isinstance(spec, KeyMap):
        keys = st.binary(min_size=spec.key_bytes, max_size=spec.key_bytes)
        return (st.dictionaries(keys, st.lists(keys | st.binary(max_size=20), max_size=24),
                                max_size=4) | values)
    if isinstance(spec, Scalar):
        return values
    return values


@st.composite
def messages(draw, types: set[str] | None = None, valid_envelope: bool = True) -> dict:
    """A request of one of ``types``: each field near-valid or hostile, some left out, some
    extra ones added."""
    type_ = draw(st.sampled_from(sorted(types or protocol.SCHEMAS)))
    message: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION, "type": type_,
                               "id": draw(st.integers(0, 2**63 - 1) | edge_ints)}
    if not valid_envelope and draw(st.booleans()):
        message[draw(st.sampled_from(["v", "type", "id"]))] = draw(values)
    for field, spec in protocol.SCHEMAS[type_].items():
        choice = draw(st.integers(0, 9))
        if choice == 0:
            continue  # left out
        message[field] = draw(values) if choice == 1 else draw(near(spec))
    message.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=3)))
    return message


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


@st.composite
def payloads(draw, types: set[str] | None = None) -> bytes:
    """Bytes a socket may deliver: garbage, any msgpack value, a message of ``types``, or one
    of those cut short or with a byte flipped."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return pack(draw(values))
    data = pack(draw(messages(types, valid_envelope=kind != 2)))
    if kind == 4 and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == 5 and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data
