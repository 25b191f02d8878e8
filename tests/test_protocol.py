import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare import protocol
from lmshare.errors import ProtocolError

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)


@given(st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=6))
def test_any_message_round_trips_or_is_refused_cleanly(fields):
    fields.pop("v", None)
    fields.pop("type", None)
    fields.pop("id", None)
    message = protocol.request("ping", 3, **fields)
    decoded = protocol.decode_raw(protocol.encode(dict(message)))
    assert decoded == message


@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_decoder(data):
    try:
        protocol.decode_request(data)
    except ProtocolError as exc:
        assert protocol.error_code_of(exc) in vars(protocol.ErrorCode).values()


@given(st.sampled_from(sorted(protocol.SCHEMAS)), st.data())
def test_a_missing_or_mistyped_field_is_refused(type_, data):
    schema = protocol.SCHEMAS[type_]
    if not schema:
        return
    field = data.draw(st.sampled_from(sorted(schema)))
    message = protocol.request(type_, 1, **{f: t[0]() for f, t in schema.items()})
    del message[field]
    with pytest.raises(ProtocolError, match=f"needs field '{field}'"):
        protocol.decode_request(protocol.encode(message))
    message[field] = next(v for v in ("x", 1.5, [], {}) if not isinstance(v, schema[field]))
    with pytest.raises(ProtocolError, match="has type"):
        protocol.decode_request(protocol.encode(message))


def test_envelope_errors_name_their_code():
    cases = {
        b"\xc1": "bad_message",
        msgpack.packb([1, 2]): "bad_message",
        msgpack.packb({"v": 99, "type": "ping"}): "bad_version",
        msgpack.packb({"v": 1, "type": "launch_missiles"}): "unknown_type",
    }
    for data, code in cases.items():
        with pytest.raises(ProtocolError) as info:
            protocol.decode_request(data)
        assert protocol.error_code_of(info.value) == code
    with pytest.raises(ProtocolError, match="too_large"):
        protocol.decode_request(b"x" * 100, max_bytes=10)
