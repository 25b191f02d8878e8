import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare import protocol
from lmshare.errors import ERROR_CODES, ProtocolError
from lmshare.schema import Optional

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
        assert exc.code in ERROR_CODES


@given(st.sampled_from(sorted(protocol.SCHEMAS)), st.data())
def test_a_missing_or_mistyped_field_is_refused(type_, data):
    schema = {f: spec for f, spec in protocol.SCHEMAS[type_].items()
              if not isinstance(spec, Optional)}
    if not schema:
        return
    field = data.draw(st.sampled_from(sorted(schema)))
    message = protocol.request(type_, 1, **{f: spec.example() for f, spec in schema.items()})
    protocol.decode_request(protocol.encode(dict(message)))  # the examples are valid
    del message[field]
    with pytest.raises(ProtocolError, match=f"needs field '{field}'"):
        protocol.decode_request(protocol.encode(message))
    example = schema[field].example()
    message[field] = next(v for v in ("x", 1.5, [], {}, None) if type(v) is not type(example)
                          and not (isinstance(example, float) and isinstance(v, int)))
    with pytest.raises(ProtocolError, match="has type"):
        protocol.decode_request(protocol.encode(message))


@pytest.mark.parametrize("fields, code", [
    ({"lease_s": float("nan")}, "bad_message"),
    ({"lease_s": float("inf")}, "bad_message"),
    ({"lease_s": -1.0}, "bad_message"),
    ({"lease_s": 1e300}, "bad_message"),
    ({"keys": [b"k" * 15]}, "bad_message"),
    ({"keys": [b"k" * 16] * (protocol.MAX_KEYS + 1)}, "too_large"),
    ({"namespace": b"n" * 17}, "bad_message"),
    ({"peers": 1}, "bad_message"),
])
def test_values_out_of_range_are_refused(fields, code):
    message = protocol.request("acquire", 1, namespace=b"n" * 16, keys=[b"k" * 16], peers=True,
                               lease_s=5.0)
    protocol.decode_request(protocol.encode(dict(message)))
    message.update(fields)
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(protocol.encode(message))
    assert info.value.code == code
    assert len(str(info.value)) < 300  # the error names the field, never echoes the value


@pytest.mark.parametrize("stats", [{"used_bytes": -2**63},
                                   {"used_bytes": 2**64 - 1}, {"used_bytes": float("nan")},
                                   {"used_bytes": 1e20}, {"x" * 100: 1}])
def test_heartbeat_counters_are_bounded(stats):
    message = protocol.request("heartbeat", 1, worker_id="w", epoch=1, seq=0, stats=stats)
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(protocol.encode(message))
    assert info.value.code == "bad_message"


def test_register_caps_strings_and_extra():
    fields = dict(worker_id="w", host="h", data_port=1, transports=["tcp"], capacity_bytes=1,
                  host_id="x")
    protocol.decode_request(protocol.encode(protocol.request("register", 1, **fields)))
    for bad in ({"host": "h" * (40 << 20)}, {"extra": "not a map"}, {"extra": {"k": [1]}},
                {"extra": {"k": float("nan")}}, {"worker_id": ""}, {"data_port": 0},
                {"transports": ["tcp"] * 9}):
        message = protocol.request("register", 1, **{**fields, **bad})
        with pytest.raises(ProtocolError):
            protocol.decode_request(protocol.encode(message), max_bytes=64 << 20)


def test_a_reply_that_cannot_be_encoded_becomes_an_error_reply():
    reply = protocol.decode_raw(protocol.encode_reply(protocol.ok(7, total=2**65)))
    assert reply["type"] == "error" and reply["code"] == "internal" and reply["id"] == 7


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
        assert info.value.code == code
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(b"x" * 100, max_bytes=10)
    assert info.value.code == "too_large"
