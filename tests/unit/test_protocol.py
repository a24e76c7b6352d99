"""The wire protocol: what one end encodes the other decodes, and junk never crashes it."""

import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remoting import protocol
from remoting.protocol import ProtocolError

_VALUES = {
    protocol.STR: st.text(max_size=40),
    protocol.INT: st.integers(min_value=-(2**53), max_value=2**53),
    protocol.NUM: st.one_of(
        st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False)
    ),
    protocol.BOOL: st.booleans(),
    protocol.LIST: st.lists(st.integers(), max_size=5),
    protocol.DICT: st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
}


@st.composite
def valid_messages(draw):
    msg_type = draw(st.sampled_from(sorted(protocol.MESSAGES)))
    spec = protocol.MESSAGES[msg_type]
    fields = {k: draw(_VALUES[kind]) for k, kind in spec.required.items()}
    for k, kind in spec.optional.items():
        if draw(st.booleans()):
            fields[k] = draw(_VALUES[kind])
    low, high = spec.payloads
    payloads = draw(st.lists(st.binary(max_size=64), min_size=low, max_size=high))
    return msg_type, fields, payloads


@given(valid_messages())
@settings(max_examples=300)
def test_every_message_round_trips(message):
    msg_type, fields, payloads = message
    decoded = protocol.decode(protocol.encode(msg_type, payloads, **fields))
    assert decoded.type == msg_type
    assert decoded.header["protocol"] == protocol.PROTOCOL_VERSION  # every message says it
    assert {k: v for k, v in decoded.header.items() if k not in protocol.ENVELOPE} == fields
    assert list(decoded.payloads) == payloads


@given(st.lists(st.binary(max_size=200), max_size=5))
@settings(max_examples=300)
def test_random_frames_only_ever_raise_protocol_error(frames):
    try:
        protocol.decode(frames)
    except ProtocolError as exc:
        assert str(exc).endswith(".")


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=8), st.booleans(), st.lists(st.integers())
        ),
        max_size=6,
    ),
    st.sampled_from(sorted(protocol.MESSAGES)),
)
@settings(max_examples=300)
def test_random_headers_only_ever_raise_protocol_error(header, msg_type):
    header["type"] = msg_type
    try:
        protocol.decode([protocol.MAGIC, json.dumps(header).encode()])
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "frames, words",
    [
        ([b"XX", b"{}"], "magic"),
        ([protocol.MAGIC, b"not json"], "not JSON"),
        ([protocol.MAGIC, b"[1]"], "not a JSON object"),
        ([protocol.MAGIC, b'{"type":"nope"}'], "unknown message type"),
        ([protocol.MAGIC, b'{"type":"release","token":"t","id":1}'], "lacks its 'share_id'"),
        ([protocol.MAGIC, b'{"type":"allocate","token":"t","id":1,"gpus":true}'], "must be int"),
        (
            [protocol.MAGIC, b'{"type":"ack","token":"t","proc_id":"p","seq":1,"evil":1}'],
            "unknown fields",
        ),
        ([protocol.MAGIC, b'{"type":"stdin","token":"t","proc_id":"p","seq":1}'], "payload frames"),
        ([protocol.MAGIC, b"{" + b" " * protocol.MAX_HEADER_BYTES + b"}"], "over"),
        (
            [protocol.MAGIC, b'{"type":"out","proc_id":"p","seq":1,"stream":1,"split":[2]}', b"x"],
            "'split'",
        ),
        (
            [protocol.MAGIC, b'{"type":"out","proc_id":"p","seq":1,"stream":1,"split":"1"}', b"x"],
            "'split'",
        ),
        (
            [protocol.MAGIC, b'{"type":"out","proc_id":"p","seq":1,"stream":1,"split":[0,1]}', b""],
            "'split'",
        ),
    ],
)
def test_malformed_messages_are_named(frames, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.decode(frames)


def test_encode_refuses_a_field_of_the_wrong_kind():
    with pytest.raises(ProtocolError, match="'gpus'"):
        protocol.encode("allocate", token="t", id=1, gpus="two")


def test_a_large_payload_travels_in_pieces_and_arrives_whole():
    """Big kernel output is cut into frames CurveZMQ can seal one by one (pipelined); the
    receiver gets back exactly the frames the kernel sent, in order."""
    big = bytes(range(256)) * (3 * protocol.SPLIT_BYTES // 256 + 7)  # 3 pieces and a bit
    payloads = [b"<IDS|MSG>", b"sig", big, b"", big[:10]]
    frames = protocol.encode("kernel_out", payloads, kernel_id="k", channel="iopub")
    assert len(frames) == 2 + 4 + 4  # the big one took four frames
    assert max(len(f) for f in frames) == protocol.SPLIT_BYTES
    wire = [bytes(f) for f in frames]  # as the other end receives them
    decoded = protocol.decode(wire)
    assert [protocol.as_bytes(p) for p in decoded.payloads] == payloads
    assert "split" not in decoded.header


def test_pieces_adding_up_to_more_than_the_limit_are_refused_before_joining():
    piece = b"x" * protocol.SPLIT_BYTES
    count = protocol.MAX_PAYLOAD_BYTES // protocol.SPLIT_BYTES + 1
    header = {"type": "out", "proc_id": "p", "seq": 1, "stream": 1, "split": [count]}
    with pytest.raises(ProtocolError, match="over"):
        protocol.decode([protocol.MAGIC, json.dumps(header).encode(), *[piece] * count])


def test_pieces_are_joined_only_when_read():
    """The gateway decodes a message before it checks the sender's token: had decoding
    joined 64 MiB of pieces, anyone able to connect could make it copy that much for
    nothing. Read, the payload is whole."""
    mib = 1024 * 1024
    fields = {"token": "not checked yet", "kernel_id": "k", "channel": "shell"}
    wire = [bytes(f) for f in protocol.encode("kernel_in", [b"x" * (64 * mib)], **fields)]
    tracemalloc.start()
    try:
        msg = protocol.decode(wire)
        decoded = tracemalloc.get_traced_memory()[1]
        payload = protocol.as_bytes(msg.payloads[0])
        read = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded < 4 * mib, f"decoding alone allocated {decoded // mib} MiB"
    assert read >= 64 * mib
    assert payload == b"x" * (64 * mib)
